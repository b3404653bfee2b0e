"""`python -m lora_repro.evaluate decode|score run=...` on a real (tiny) run directory."""

import json
import shutil

import pytest

from lora_repro import run_reader, rundir
from lora_repro.errors import UserError
from lora_repro.evaluate import main
from lora_repro.trainer import train
from tests.test_train import QUICK, make_cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    # The " ||" format: 12 steps teach the official format's model to end every output at
    # once (an all-empty predictions file, which `score` refuses).
    train(make_cfg(*QUICK, "eval.test=false", "task.n_test=6", "task.prompt_format=text"), path)
    return path


def test_decode_writes_predictions_and_metrics_into_the_run(run_dir, capsys):
    summary = rundir.read_json(run_dir / rundir.SUMMARY)
    assert "BLEU" not in summary["metrics"]  # trained with eval.test=false
    assert main(["decode", f"run={run_dir}", "eval.beam=3", "eval.max_new_tokens=12"]) == 0
    printed = json.loads(capsys.readouterr().out)
    predictions = (run_dir / rundir.PREDICTIONS).read_text().splitlines()
    assert len(predictions) == 6
    metrics = rundir.read_json(run_dir / rundir.SUMMARY)["metrics"]
    assert set(metrics) >= {"val_loss", "BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "decode_s"}
    assert metrics["BLEU"] == printed["BLEU"] and 0 <= metrics["ROUGE_L"] <= 1
    artifacts = rundir.read_json(run_dir / rundir.SUMMARY)["artifacts"]  # vouches for them now
    assert artifacts[rundir.PREDICTIONS] == rundir.sha256(run_dir / rundir.PREDICTIONS)
    assert main(["score", f"run={run_dir}"]) == 0  # re-scoring the same file gives the same
    rescored = json.loads(capsys.readouterr().out)
    assert all(rescored[k] == pytest.approx(printed[k]) for k in rescored)


def test_tagged_decode_writes_side_files_and_leaves_the_run_alone(run_dir, capsys):
    settings = ["eval.beam=3", "eval.max_new_tokens=12"]
    assert main(["decode", f"run={run_dir}", *settings]) == 0
    summary = (run_dir / rundir.SUMMARY).read_text()
    predictions = (run_dir / rundir.PREDICTIONS).read_text()
    capsys.readouterr()
    assert main(["decode", f"run={run_dir}", *settings, "eval.decoder=hf", "eval.stop_texts=[]",
                 "--tag", "hf"]) == 0
    printed = json.loads(capsys.readouterr().out)
    side = (run_dir / "predictions-hf.txt").read_text().splitlines()
    changed = sum(a != b for a, b in zip(side, predictions.splitlines(), strict=True))
    assert printed["changed_outputs"] == changed and len(side) == 6
    saved = rundir.read_json(run_dir / "decode-hf.json")
    assert saved["metrics"]["BLEU"] == printed["BLEU"]
    assert saved["eval"]["decoder"] == "hf" and saved["prompt_format"] == "text"
    assert (run_dir / rundir.SUMMARY).read_text() == summary
    assert (run_dir / rundir.PREDICTIONS).read_text() == predictions
    assert main(["decode", f"run={run_dir}", "--tag", "a/b"]) == 2


def test_a_run_saved_before_prompt_format_used_the_text_format(run_dir, tmp_path):
    summary = rundir.read_json(run_dir / rundir.SUMMARY)
    assert summary["config"]["task"]["prompt_format"] == "text"  # the run records its format
    for part in ("config", "identity"):
        del summary[part]["task"]["prompt_format"]
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    rundir.write_json(old / rundir.SUMMARY, summary)
    cfg = run_reader.run_config(old)
    assert cfg.task.prompt_format == "text"  # so `decode run=old` feeds " ||" prompts
    rundir.check_same_run(old, summary["identity"], cfg)  # its rerun is the same run
    cfg.task.prompt_format = "official"
    with pytest.raises(UserError, match="task.prompt_format: 'text' -> 'official'"):
        rundir.check_same_run(old, summary["identity"], cfg)
    corpus = {"task": {"name": "corpus"}}  # a corpus run has no prompts: any format is its
    assert rundir.flat_identity(corpus)["task.prompt_format"] == "official"


@pytest.mark.parametrize("args,match", [
    (["decode", "run=/nonexistent"], "not a run directory"),
    (["decode", "eval.beam=3"], "exactly one run=PATH"),
    (["decode", "RUN", "eval.bem=3"], "Key 'bem' not in 'EvalConfig'"),
    (["decode", "RUN", "beam"], "overrides are key=value"),
    (["score"], "--refs REFS.csv and --hyp HYP.txt, or run=PATH"),
])
def test_errors_are_one_line(run_dir, capsys, args, match):
    args = [f"run={run_dir}" if a == "RUN" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and match in err
