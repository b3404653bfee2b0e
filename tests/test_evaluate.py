"""`python -m lora_repro.evaluate decode|score run=...` on a real (tiny) run directory."""

import json

import pytest

from lora_repro import rundir
from lora_repro.evaluate import main
from lora_repro.trainer import train
from tests.test_train import QUICK, make_cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    train(make_cfg(*QUICK, "eval.test=false", "task.n_test=6"), path)
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
