"""Training: config composition and validation, run directories, resume, determinism, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_repro import rundir
from lora_repro.config import check_positions
from lora_repro.errors import UserError
from lora_repro.lora import read_adapter
from lora_repro.tracking import Tracker
from lora_repro.train import compose_config, job_name
from lora_repro.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# The smoke preset, shrunk further: a few seconds per run.
QUICK = ["+experiment=smoke", "model.init=random", "eval.base=false", "max_steps=12",
         "task.n_train=60", "task.n_valid=8", "task.n_test=4", "logger.wandb.mode=disabled",
         "logger.every=4", "eval.beam=2", "eval.max_new_tokens=8"]


def make_cfg(*overrides):
    return compose_config(list(overrides))


def cli(*args, cwd=ROOT, timeout=300):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lora_repro.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_preset_composes_and_validates(experiment):
    cfg = make_cfg(f"+experiment={experiment}")
    assert cfg.name == experiment


def test_defaults_are_the_papers_e2e_setting():
    cfg = make_cfg()
    assert (cfg.model.id, cfg.task.name, cfg.targets, cfg.rank, cfg.alpha) == (
        "gpt2-medium", "e2e", "qv", 4, 32.0)
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs, cfg.warmup_steps) == (
        2e-4, 0.01, 8, 5, 500)
    assert (cfg.label_smoothing, cfg.dropout, cfg.task.length_penalty) == (0.1, 0.1, 0.9)
    assert make_cfg("task=webnlg").task.length_penalty == 0.8
    assert (cfg.task.prompt_format, cfg.eval.decoder, cfg.eval.stop_texts, cfg.eval.precision) == (
        "official", "official", ["\n\n"], "fp32")  # the official pipeline (README Evaluation)


@pytest.mark.parametrize("override,match", [
    ("rank=0", "rank=0"), ("targets=qx", "'x'"), ("alpha=-1", "alpha=-1"),
    ("dropout=1.5", "dropout=1.5"), ("lr=0", "lr=0"), ("precision=fp8", "precision"),
    ("method=half", "method"), ("task.valid_fraction=1.0", "task.valid_fraction"),
    ("max_time_min=0", "max_time_min=0"), ("threads=0", "threads=0"),
    ("adam_beta2=1.5", "adam_beta2=1.5"), ("seed=-1", "seed=-1"),
    ("task.prompt_format=bar", "task.prompt_format"), ("eval.decoder=bar", "eval.decoder"),
])
def test_validation_names_the_key(override, match):
    with pytest.raises(UserError, match=match) as info:
        make_cfg(override)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides,match", [
    (["task.max_length=500"], r"task.max_length=500 \+ eval.max_new_tokens=64 .* 512 positions"),
    (["task=corpus", "task.block_size=1024"], "task.block_size=1024 .* 512 positions"),
])
def test_sequences_longer_than_the_positions_are_refused(overrides, match):
    make_cfg("model=tiny", "task.max_length=448")  # 448 + 64 = 512 fits
    with pytest.raises(UserError, match=match):
        make_cfg("model=tiny", *overrides)
    cfg = make_cfg("task.max_length=1000", "eval.test=false")  # pretrained: checked on loading
    with pytest.raises(UserError, match="task.max_length=1000 tokens .* 512 positions"):
        check_positions(cfg, 512)


def test_quick_run_writes_a_complete_run_dir(tmp_path):
    summary = train(make_cfg(*QUICK), tmp_path)
    assert (tmp_path / rundir.SUMMARY).is_file() and (tmp_path / rundir.ADAPTER).is_file()
    assert json.loads((tmp_path / rundir.SUMMARY).read_text())["steps"] == 12
    lines = [json.loads(x) for x in (tmp_path / rundir.METRICS).read_text().splitlines()]
    assert [x["step"] for x in lines if "train_loss" in x] == [4, 8, 12]
    assert lines[-1]["val_loss"] == summary["metrics"]["val_loss"] > 0
    n_test = len((tmp_path / rundir.PREDICTIONS).read_text().splitlines())
    assert n_test == 4
    assert set(summary["metrics"]) >= {"val_loss", "BLEU", "NIST", "ROUGE_L", "CIDEr"}
    assert summary["trainable_params"] == 2 * 2 * 4 * (128 + 128)  # layers x qv x r(d_in+d_out)
    tensors, meta = read_adapter(tmp_path / rundir.ADAPTER)
    assert meta["targets"] == "qv" and meta["rank"] == "4"
    assert not list(tmp_path.rglob("*.tmp"))


def test_training_lowers_the_loss(tmp_path):
    cfg = make_cfg(*QUICK, "max_steps=40", "eval.test=false", "lr=1e-2", "targets=qvo")
    train(cfg, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / rundir.METRICS).read_text().splitlines()]
    losses = [x["train_loss"] for x in lines if "train_loss" in x]
    assert losses[-1] < losses[0] - 0.2


def test_same_seed_gives_bit_identical_adapters(tmp_path):
    cfg = make_cfg(*QUICK, "eval.test=false")
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b")
    a, _ = read_adapter(tmp_path / "a" / rundir.ADAPTER)
    b, _ = read_adapter(tmp_path / "b" / rundir.ADAPTER)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = make_cfg(*QUICK, "eval.test=false", "seed=2")
    train(c, tmp_path / "c")
    other, _ = read_adapter(tmp_path / "c" / rundir.ADAPTER)
    assert not torch.equal(a["h.0.q.lora_A"], other["h.0.q.lora_A"])


class Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    overrides = [*QUICK, "eval.test=false", "epochs=2", "max_steps=null", "task.n_train=40",
                 "checkpoint_every=3", "logger.every=2"]
    cfg = make_cfg(*overrides)
    train(cfg, tmp_path / "whole")

    log = Tracker.log

    def dies_at_step_10(self, metrics, step):
        if step >= 10:
            raise Killed  # mid-epoch 2: the last checkpoint is at step 9
        log(self, metrics, step)

    monkeypatch.setattr(Tracker, "log", dies_at_step_10)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / rundir.SUMMARY).exists()
    monkeypatch.setattr(Tracker, "log", log)
    summary = train(cfg, tmp_path / "resumed")
    whole, _ = read_adapter(tmp_path / "whole" / rundir.ADAPTER)
    resumed, _ = read_adapter(tmp_path / "resumed" / rundir.ADAPTER)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / rundir.METRICS).open()]
    assert steps == sorted(steps) and summary["steps"] > 10
    # The metrics carry over the restart exactly, timings aside: the checkpoint at step 9 (not
    # a log step) keeps the loss window, so step 10 logs the mean of steps 9 and 10 again.
    whole, resumed = (_untimed(tmp_path / run / rundir.METRICS) for run in ("whole", "resumed"))
    assert resumed == whole and any("train_loss" in x for x in whole)
    whole_summary = rundir.read_json(tmp_path / "whole" / rundir.SUMMARY)
    assert summary["train_tokens"] == whole_summary["train_tokens"]
    assert summary["metrics"] == whole_summary["metrics"]


def _untimed(metrics: Path) -> list[dict]:
    """The lines of a metrics.jsonl without their timing fields."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time")} for r in rows]


def test_gradient_accumulation_averages_a_short_last_group(tmp_path):
    # 8 batches an epoch in groups of 3: the third group holds 2 micro-batches, and its loss is
    # their mean (not 2/3 of it). At this lr the loss barely moves, so every step's is alike.
    cfg = make_cfg(*QUICK, "eval.test=false", "max_steps=null", "epochs=1", "task.n_train=40",
                   "grad_accum=3", "logger.every=1", "lr=1e-6")
    train(cfg, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / rundir.METRICS).read_text().splitlines()]
    losses = [x["train_loss"] for x in lines if "train_loss" in x]
    assert len(losses) == 3 and max(losses) / min(losses) < 1.05


def test_rerun_of_complete_run_is_skipped_and_other_settings_refused(tmp_path):
    cfg = make_cfg(*QUICK, "eval.test=false")
    train(cfg, tmp_path)
    mtime = (tmp_path / rundir.SUMMARY).stat().st_mtime_ns
    train(cfg, tmp_path)
    assert (tmp_path / rundir.SUMMARY).stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="lr: 0.006 -> 0.001"):
        train(make_cfg(*QUICK, "eval.test=false", "lr=1e-3"), tmp_path)
    assert rundir.read_json(tmp_path / rundir.CONFIG)["lr"] == 0.006  # the refused run's untouched


def test_wandb_offline_writes_run_files(tmp_path):
    cfg = make_cfg(*QUICK, "eval.test=false", "logger.wandb.mode=offline", "max_steps=4")
    train(cfg, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_offline_e2e_trains_on_shared_data(shared_dir, tmp_path):
    cfg = make_cfg("+experiment=offline_e2e", "model=tiny", "max_steps=6", "eval.test=false",
                   "logger.wandb.mode=disabled", "task.max_length=96",
                   "task.max_valid_examples=16",  # validating ~470 costs 30 s on 2 cores
                   f"task.data_dir={shared_dir / 'data' / 'e2e'}")
    summary = train(cfg, tmp_path)
    assert summary["train_examples"] > 3500  # 90% of the dev set's 4,672 references
    assert summary["steps"] == 6


@pytest.mark.slow
def test_cli_smoke_and_sweep_dirs(tmp_path):
    quick = [a for a in QUICK if not a.startswith("eval.")] + ["eval.test=false"]
    out = cli("-m", *quick, "rank=1,2", "targets=qv,qkvo", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = sorted(p.name for p in tmp_path.iterdir() if (p / rundir.SUMMARY).is_file())
    # The swept keys lead the name; the other overrides follow it.
    assert [j.split("_")[0] for j in jobs] == ["r1-qkvo-s1", "r1-qv-s1", "r2-qkvo-s1", "r2-qv-s1"]
    assert jobs[0].endswith(
        "_max_steps-12_model.init-random_task.n_test-4_task.n_train-60_task.n_valid-8")
    for job in jobs:  # each job ends with one line: its dir and final metrics
        val_loss = json.loads((tmp_path / job / rundir.SUMMARY).read_text())["metrics"]["val_loss"]
        assert f"{tmp_path / job}: val_loss {val_loss:.4f} (" in out.stdout


@pytest.mark.parametrize("args,match", [
    (["rank=0"], "rank=0"),
    (["targets=qx"], "'x'"),
    (["task=nope"], "task='nope' is not an option"),
    (["task.data_dir=/nonexistent", "task=e2e"], "task.data_dir='/nonexistent'"),
    (["rank=abc"], "rank: Value 'abc'"),
    (["reank=4"], "unknown key 'reank'; allowed there: model, task"),
    (["model.n_layr=3"], "unknown key 'model.n_layr'; allowed there: id, name"),
    (["-m", "rank=4,0"], "rank=0"),  # a sweep checks every value before its first job
    (["-m", "rank=1,2", "hydra.launcher.per_gpu=0"], "hydra.launcher.per_gpu=0: must be"),
    (["-m", "rank=1,2", "hydra.launcher.per_gpu=many"], "or auto (the default"),
    (["-m", "rank=1,2", "hydra.launcher.pack=two"], "hydra.launcher.pack=two: must be"),
    (["-m", "rank=1,2", "hydra.launcher.mps=yes"], "hydra.launcher.mps=yes: must be auto"),
])
def test_cli_bad_input_is_one_line_and_leaves_no_summary(args, match, tmp_path):
    out = cli("+experiment=smoke", *args, f"hydra.run.dir={tmp_path}",
              f"hydra.sweep.dir={tmp_path}", timeout=60)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and match in errors[0], out.stderr
    assert not (tmp_path / rundir.SUMMARY).exists() and not list(tmp_path.rglob("*.safetensors"))


def test_cli_sweep_runs_the_other_jobs_past_a_bad_one(tmp_path):
    quick = [a for a in QUICK if not a.startswith("eval.")] + ["eval.test=false", "max_steps=2"]
    # rank 200 > the tiny model's d_model (128): found only when LoRA meets the model.
    out = cli("-m", *quick, "rank=200,2", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "rank=200" in errors[0] and "1 job(s)" in errors[1]
    done = [p.name.split("_")[0] for p in tmp_path.iterdir() if (p / rundir.SUMMARY).is_file()]
    assert done == ["r2-qv-s1"]
    assert not list(tmp_path.rglob(".hydra"))  # each job's config is its own run_config.json


def test_cli_sweep_reports_a_failed_job_from_a_launchers_worker(tmp_path):
    """With submitit (the SLURM launcher's local twin) jobs run in worker processes; the
    command still names the failed job and its error, and exits 2."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    quick = [a for a in QUICK if not a.startswith("eval.")] + ["eval.test=false", "max_steps=2"]
    out = cli("-m", "hydra/launcher=submitit_local", *quick, "rank=200,2",
              f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 job(s) of the sweep failed: r200-qv-s1") and "rank=200" in last


def test_job_directories_name_canonical_targets_and_group_overrides_under_presets():
    assert job_name("lora", 4, "vq", 1) == "r4-qv-s1"
    assert job_name("lora", 4, "qv", 1, "lr-0.001_model-gpt2-large", "table3_e2e") == (
        "r4-qv-s1_lr-0.001_model-gpt2-large")
    assert job_name("lora", 4, "qv", 1, "model-gpt2_task-dart", "dart-gpt2") == "r4-qv-s1"


def test_lora_keys_are_no_part_of_a_full_fine_tuning_run():
    full = rundir.identity(make_cfg("method=full"))
    assert full == rundir.identity(make_cfg("method=full", "rank=8", "targets=qkvo"))
    assert "rank" not in full and rundir.identity(make_cfg("rank=8"))["rank"] == 8


def test_resume_survives_a_metrics_line_cut_short_and_names_a_corrupt_checkpoint(tmp_path):
    metrics = tmp_path / rundir.METRICS
    metrics.write_text('{"step": 4, "train_loss": 1.0}\n{"step": 8, "train_loss": 0.9}\n{"st')
    Tracker(tmp_path, make_cfg(*QUICK).logger.wandb, {}, "g", resume_step=4).finish()
    assert metrics.read_text() == '{"step": 4, "train_loss": 1.0}\n'
    (tmp_path / rundir.CHECKPOINT).parent.mkdir()
    (tmp_path / rundir.CHECKPOINT).write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(UserError, match="unreadable checkpoint .* delete it"):
        train(make_cfg(*QUICK), tmp_path)


def test_divergence_stops_the_run_at_a_log_step(tmp_path):
    with pytest.raises(UserError, match="training diverged: train_loss nan by step 4"):
        train(make_cfg(*QUICK, "eval.test=false", "lr=1e6"), tmp_path)
    assert not (tmp_path / rundir.SUMMARY).exists()
