"""No result that looks complete but is not, and every failure one line (issue 14).

Each test is one case that used to fail: a run of 0 examples, a failed sweep job the analysis
did not mention, an OS error that ended a sweep, a model directory without weights, a damaged
file of a complete job, bad data found late, a resume that logged another loss, a scorer that
refused a trailing blank line or called a directory a missing file.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from analysis import tables
from analysis.sweep_runs import load_runs
from lora_repro import rundir
from lora_repro.config import ModelConfig
from lora_repro.errors import UserError
from lora_repro.evaluate import main as evaluate_main
from lora_repro.modeling import load_model, load_tokenizer
from lora_repro.train import precheck
from lora_repro.trainer import train
from tests.test_train import QUICK, cli, make_cfg

E2E_LOCAL = ["model=tiny", "task=e2e", "device=cpu", "threads=1", "logger.wandb.mode=disabled",
             "task.valid_file=null", "task.test_file=null", "max_steps=2",
             "task.max_length=128", "eval.test=false"]


def one_error(out) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


# ---------------------------------------------------------------- 1: nothing to train on


@pytest.mark.parametrize("case", ["header-only csv", "n_train=0"])
def test_a_run_with_no_training_examples_is_refused_before_its_directory_exists(case, tmp_path):
    if case == "header-only csv":
        (tmp_path / "trainset.csv").write_text("mr,ref\n")
        cfg = make_cfg(*E2E_LOCAL, f"task.data_dir={tmp_path}")
        match = "trainset.csv holds no examples"
    else:
        cfg = make_cfg(*QUICK, "task.n_train=0")
        match = "task.n_train=0"
    with pytest.raises(UserError, match=match):
        train(cfg, tmp_path / "job")
    assert not (tmp_path / "job").exists()


# ---------------------------------------------------------------- 2: failed jobs and the analysis


def _summary(rank: int, seed: int, bleu: float) -> dict:
    config = {"model": {"id": "tiny"}, "task": {"name": "e2e"}, "method": "lora",
              "targets": "qv", "rank": rank, "seed": seed, "lr": 0.001}
    return {"config": config, "identity": config, "trainable_params": 1000 * rank,
            "metrics": {"BLEU": bleu, "val_loss": 1.0 + bleu}}


def test_analysis_names_failed_and_incomplete_jobs_and_cells_of_fewer_seeds(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for rank, seed, bleu in [(4, 1, 0.60), (4, 2, 0.62), (8, 1, 0.65)]:
        job = sweep / f"r{rank}-qv-s{seed}"
        job.mkdir(parents=True)
        rundir.write_json(job / rundir.SUMMARY, _summary(rank, seed, bleu))
    (sweep / ".failed").mkdir()  # as a sweep leaves it: `<sweep>/.failed/<job>`, one line
    (sweep / ".failed" / "r8-qv-s2").write_text("r8-qv-s2: UserError: rank=8 too big\n")
    (sweep / "r8-qv-s3").mkdir()
    (sweep / "r8-qv-s3" / rundir.CONFIG).write_text("{}")
    _, runs = load_runs(sweep)
    warned = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(runs) == 3 and len(warned) == 2, warned
    assert "r8-qv-s2: failed (UserError: rank=8 too big)" in warned[1]
    assert "r8-qv-s3: incomplete" in warned[0]
    table = tables.table18([run.summary for run in runs])
    assert list(table["BLEU"]) == ["61.00±1.41", "65.00 (n=1)"]
    assert tables.fewer_seeds([run.summary for run in runs]) == ["qv r8 (n=1)"]  # for the grid


def test_a_sweep_job_failing_with_an_os_error_is_its_one_line_and_the_sweep_goes_on(tmp_path):
    quick = [a for a in QUICK if not a.startswith("eval.")] + ["eval.test=false", "max_steps=2"]
    (tmp_path / "j1" / rundir.METRICS).mkdir(parents=True)  # metrics.jsonl cannot be written
    out = cli("-m", *quick, "rank=1,2", f"hydra.sweep.dir={tmp_path}",
              "hydra.sweep.subdir=j${rank}")
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert errors[0].startswith("error: j1: IsADirectoryError: ") and "metrics.jsonl" in errors[0]
    assert errors[1].startswith("error: 1 job(s) of the sweep failed: j1: IsADirectoryError")
    assert (tmp_path / "j2" / rundir.SUMMARY).is_file()
    assert (tmp_path / rundir.FAILED / "j1").read_text().startswith("j1: IsADirectoryError")


# ---------------------------------------------------------------- 3: a model dir without weights


def test_a_model_directory_without_weights_is_one_line_naming_it(tmp_path):
    cfg = ModelConfig(init="pretrained", name=str(tmp_path), tokenizer="byt5")
    with pytest.raises(UserError, match=f"model.name='{tmp_path}': no weights "
                                        r"\(model.safetensors or pytorch_model.bin"):
        load_model(cfg, load_tokenizer("byt5"))


# ---------------------------------------------------------------- 4: a complete job's files damaged


def test_a_damaged_adapter_of_a_complete_job_is_named_by_rerun_and_analysis(tmp_path):
    cfg = make_cfg(*QUICK, "eval.test=false", "max_steps=2")
    job = tmp_path / "sweep" / "r4-qv-s1"
    summary = train(cfg, job)
    train(cfg, job)  # intact: skipped
    adapter = job / rundir.ADAPTER
    adapter.write_bytes(adapter.read_bytes()[:-100])
    match = (f"{adapter} is damaged \\(its sha256 differs from summary.json\\); delete the job "
             f"directory {job} to retrain it")
    with pytest.raises(UserError, match=match):
        train(cfg, job)
    with pytest.raises(UserError, match=match):
        load_runs(tmp_path / "sweep")
    assert set(summary["artifacts"]) == {rundir.ADAPTER, "tokenizer/tokenizer.json",
                                         "tokenizer/tokenizer_config.json"}


# ---------------------------------------------------------------- 5: bad data, before Hydra starts


@pytest.mark.parametrize("content,args,match", [
    (b"mr,ref\n", [], "trainset.csv holds only its header"),
    (b"", [], "an E2E CSV needs columns 'mr' and 'ref', found []"),
    (b"meaning,text\nname[A],A.\n", [], "needs columns 'mr' and 'ref', found ['meaning', 'text']"),
    (b"mr,ref\nname[Caf\xe9],x\n", [], "trainset.csv is not UTF-8"),
    (b"mr,ref\nname[A],A.\n", ["task.valid_file=devset.csv"], "task.valid_file: "),
    (b"mr,ref\nname[A],A.\n", ["device=cuda"], "CUDA is not available"),
])
def test_bad_data_is_refused_by_the_command_lines_precheck(content, args, match, tmp_path):
    if "device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "trainset.csv").write_bytes(content)
    with pytest.raises(UserError, match=re.escape(match)):
        precheck([*E2E_LOCAL, f"task.data_dir={tmp_path}", *args])
    with pytest.raises(UserError, match=re.escape(match)):  # each job of a sweep too
        precheck(["-m", *E2E_LOCAL, "rank=1,2", f"task.data_dir={tmp_path}", *args])


def test_bad_data_leaves_no_job_directory(tmp_path):
    (tmp_path / "trainset.csv").write_text("mr,ref\n")
    out = cli(*E2E_LOCAL, f"task.data_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'job'}",
              timeout=60)
    assert one_error(out) == (f"error: task.train_file: {tmp_path / 'trainset.csv'} holds "
                              "only its header; give a file with at least one row")
    assert not (tmp_path / "job").exists()


# ---------------------------------------------------------------- 7: the scorer's input


@pytest.fixture
def refs(tmp_path) -> Path:
    path = tmp_path / "refs.csv"
    path.write_text("mr,ref\nname[A],A is here.\nname[A],Here is A.\nname[B],B is there.\n")
    return path


def test_trailing_blank_lines_of_a_hypothesis_file_are_ignored(refs, tmp_path, capsys):
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("A is here.\nB is there.\n")
    assert evaluate_main(["score", "--refs", str(refs), "--hyp", str(hyp), "--metrics", "BLEU"]
                         ) == 0
    clean = json.loads(capsys.readouterr().out)
    hyp.write_text("A is here.\nB is there.\n\n\n")
    assert evaluate_main(["score", "--refs", str(refs), "--hyp", str(hyp), "--metrics", "BLEU"]
                         ) == 0
    assert json.loads(capsys.readouterr().out) == clean
    hyp.write_text("A is here.\n\nB is there.\n")  # a blank line inside still counts
    assert evaluate_main(["score", "--refs", str(refs), "--hyp", str(hyp)]) == 2
    assert "has 3 lines" in capsys.readouterr().err


def test_a_directory_given_as_hypothesis_file_is_named_a_directory(refs, tmp_path, capsys):
    assert evaluate_main(["score", "--refs", str(refs), "--hyp", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: hypothesis file {tmp_path} is a directory; give the file in it"
