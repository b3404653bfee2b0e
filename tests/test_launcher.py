"""The parallel sweep launcher (`hydra/launcher=parallel`), job directory locks, temp names.

Each job of a parallel sweep is a fresh process: these tests start several, so they are few.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hydra_plugins.lora_repro_launcher import launcher
from hydra_plugins.lora_repro_launcher.launcher import packs, slots
from lora_repro import rundir
from lora_repro.lora import read_adapter
from lora_repro.train import compose_config
from lora_repro.trainer import train

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["+experiment=smoke", "max_steps=4", "task.n_train=40", "task.n_valid=8",
         "eval.test=false", "logger.wandb.mode=disabled", "logger.every=2"]


def cli(*args, timeout=600, env=None):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([sys.executable, "-m", "lora_repro.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def adapters(sweep: Path) -> dict[str, dict]:
    """{job name without the shared overrides: adapter tensors} of each complete job."""
    return {p.name.split("_")[0]: read_adapter(p / rundir.ADAPTER)[0]
            for p in sweep.iterdir() if (p / rundir.SUMMARY).is_file()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_slots_give_each_gpu_per_gpu_places():
    assert slots(["0", "1"], per_gpu=2, workers=8) == ["0", "1", "0", "1"]
    assert slots([], per_gpu=4, workers=2) == [None, None]
    with pytest.raises(ValueError, match="per_gpu=0"):
        slots(["0"], per_gpu=0, workers=1)


def test_auto_per_gpu_from_the_smallest_gpus_memory():
    h200, a100_80, rtx_24 = 143771 / 1024, 81920 / 1024, 24576 / 1024  # nvidia-smi's MiB
    assert launcher.auto_per_gpu([h200]) == 10 and launcher.auto_per_gpu([a100_80]) == 6
    assert launcher.auto_per_gpu([h200, rtx_24]) == 2 and launcher.auto_per_gpu([8.0]) == 1
    assert launcher.auto_per_gpu(None) == 4  # nvidia-smi could not tell
    assert launcher.resolve_per_gpu(3, ["0"]) == (3, "")  # a count as set: no nvidia-smi
    assert launcher.resolve_per_gpu("auto", []) == (4, "per_gpu=auto: GPU memory unknown")


def test_gpu_memory_gib_asks_nvidia_smi_for_the_given_gpus(tmp_path, monkeypatch):
    fake, calls = tmp_path / "nvidia-smi", tmp_path / "calls"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nprintf "81920\\n24576\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert launcher.gpu_memory_gib(["0", "3"]) == [80.0, 24.0]
    assert calls.read_text().split()[-2:] == ["-i", "0,3"]
    assert launcher.gpu_memory_gib(["0"]) is None  # two answers for one GPU: not trusted
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert launcher.gpu_memory_gib(["0"]) is None


def test_packs_group_jobs_with_equal_keys_in_sweep_order():
    assert packs(["a", "a", None, "b", "a", "a", "a"], 2) == [[0, 1], [2], [3], [4, 5], [6]]
    assert packs(["a", "a"], 1) == [[0], [1]]


@pytest.mark.slow
def test_a_packed_sweep_trains_its_jobs_in_one_process_each_into_its_own_dir(tmp_path):
    # no dropout: a pack draws one mask for all its jobs; eval.base (smoke's) does not pack
    no_dropout = ["dropout=0", "model.dropout=0", "eval.base=false"]
    out = cli("-m", *QUICK, *no_dropout, "rank=1,2", "targets=qv,qkvo",
              "hydra.launcher.pack=4", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in tmp_path.glob(f"*/{rundir.SUMMARY}")]
    assert len(records) == 4 and len({r["pid"] for r in records}) == 1
    assert all(sorted(r["pack"]) == sorted(p.name for p in tmp_path.glob("r*")) for r in records)
    assert out.stdout.count("started on CPU (pack of 4)") == 4
    assert out.stdout.count(": val_loss") == 4
    train(compose_config([*QUICK, *no_dropout, "rank=2", "targets=qkvo"]), tmp_path / "alone")
    alone, packed = read_adapter(tmp_path / "alone" / rundir.ADAPTER)[0], adapters(tmp_path)
    assert all(torch.allclose(alone[k], packed["r2-qkvo-s1"][k], rtol=1e-5, atol=1e-7)
               for k in alone)


@pytest.mark.slow
def test_parallel_sweep_equals_sequential_and_alone(tmp_path):
    grid = ["rank=1,2", "targets=qv,qkvo"]
    seq = cli("-m", *QUICK, *grid, f"hydra.sweep.dir={tmp_path / 'seq'}")
    assert seq.returncode == 0, seq.stderr[-2000:]
    par = cli("-m", *QUICK, *grid, "hydra.launcher.workers=2",
              f"hydra.sweep.dir={tmp_path / 'par'}")
    assert par.returncode == 0, par.stderr[-2000:]
    a, b = adapters(tmp_path / "seq"), adapters(tmp_path / "par")
    assert sorted(a) == ["r1-qkvo-s1", "r1-qv-s1", "r2-qkvo-s1", "r2-qv-s1"] == sorted(b)
    assert all(same(a[job], b[job]) for job in a)  # bit for bit
    train(compose_config([*QUICK, "rank=2", "targets=qkvo"]), tmp_path / "alone")
    assert same(read_adapter(tmp_path / "alone" / rundir.ADAPTER)[0], b["r2-qkvo-s1"])
    for job in (tmp_path / "par").iterdir():  # each job's own output is in its train.log
        if job.is_dir() and not job.name.startswith("."):
            assert job.name in (job / "train.log").read_text()
            assert f"{job}: val_loss" in par.stdout and f"{job}: started on CPU" in par.stdout


@pytest.mark.slow
def test_injected_gpus_run_at_most_per_gpu_jobs_on_each_and_a_failed_job_is_named(tmp_path):
    # 4 jobs, slots GPU 0, 1, 0, 1: all start at once, two on each GPU. r200 fails (rank >
    # d_model, found when LoRA meets the model); the others complete.
    out = cli("-m", *QUICK, "rank=1,2,4,200", "hydra.launcher.gpus=[0,1]",
              "hydra.launcher.per_gpu=2", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 job(s) of the sweep failed: r200-qv-s1") and "rank=200" in last
    assert "error: r200-qv-s1" in out.stderr and (tmp_path / ".failed").is_dir()
    records = [json.loads(p.read_text()) for p in tmp_path.glob(f"*/{rundir.SUMMARY}")]
    assert sorted(r["config"]["rank"] for r in records) == [1, 2, 4]
    assert {r["cuda_visible_devices"] for r in records} == {"0", "1"}
    for gpu in ("0", "1"):  # the most jobs alive at once on the GPU, from their own records
        spans = [(r["started_at"], r["ended_at"]) for r in records
                 if r["cuda_visible_devices"] == gpu]
        most = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
        assert 1 <= most <= 2
    assert "started on GPU 0" in out.stdout and "started on GPU 1" in out.stdout


@pytest.mark.slow
def test_mps_runs_the_jobs_under_a_daemon_of_the_sweeps_own(tmp_path):
    """With a stand-in for nvidia-cuda-mps-control on PATH that logs its calls, and mps left
    at its default (auto): the daemon starts before the jobs, they see its pipe directory,
    and it is told to quit after."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-cuda-mps-control"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -d ]; then echo "start $CUDA_MPS_PIPE_DIRECTORY" '
                    f'>> {calls}; else cat >> {calls}; fi\n')
    fake.chmod(0o755)
    smi = bin_dir / "nvidia-smi"  # per_gpu=auto (the default) asks it: a 24 GiB GPU, 2 jobs
    smi.write_text("#!/bin/sh\necho 24576\n")
    smi.chmod(0o755)
    env_path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    out = cli("-m", *QUICK, "rank=1,2", "hydra.launcher.gpus=[0]",
              f"hydra.sweep.dir={tmp_path / 'sweep'}", env={"PATH": env_path})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 at a time (2 per GPU on GPUs 0; per_gpu=auto: 24 GiB)" in out.stdout
    start, stop = calls.read_text().splitlines()
    assert start.startswith("start ") and start.endswith("mps_pipe") and stop == "quit"
    records = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob(f"*/{rundir.SUMMARY}")]
    assert len(records) == 2 and all(r["mps"] for r in records)
    out = cli("-m", *QUICK, "rank=1,2", "hydra.launcher.mps=true", f"hydra.sweep.dir={tmp_path}",
              env={"PATH": str(tmp_path / "nothing")}, timeout=60)
    assert out.returncode == 2 and "nvidia-cuda-mps-control" in out.stderr.strip().splitlines()[0]


def test_mps_auto_needs_gpus_and_the_program_and_falls_back_when_its_daemon_fails(
        tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    assert not launcher.use_mps("auto", ["0"])  # no control program
    with pytest.raises(SystemExit), launcher.mps_server(tmp_path):  # mps=true without it
        pass
    assert "not on PATH" in capsys.readouterr().err
    fake = bin_dir / launcher.MPS_CONTROL
    fake.write_text("#!/bin/sh\nexit 1\n")  # a daemon that cannot start
    fake.chmod(0o755)
    assert launcher.use_mps("auto", ["0"]) and launcher.use_mps(True, ["0"])
    assert not launcher.use_mps("auto", []) and not launcher.use_mps(False, ["0"])
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/elsewhere")  # an MPS server set up already
    assert not launcher.use_mps("auto", ["0"])
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY")
    with launcher.mps_server(tmp_path, required=False):  # auto: one line, then no MPS
        assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    assert "-d failed" in capsys.readouterr().err
    (tmp_path / "again").mkdir()
    with pytest.raises(SystemExit), launcher.mps_server(tmp_path / "again", required=True):
        pass  # mps=true: an error
    assert "mps=true" in capsys.readouterr().err


def test_a_held_job_dir_refuses_a_second_process_and_changes_nothing(tmp_path):
    job = tmp_path / "job"
    with rundir.hold(job):
        (job / rundir.CONFIG).write_text("{}\n")
        before = {p: p.stat().st_mtime_ns for p in job.rglob("*")}
        out = cli(*QUICK, f"hydra.run.dir={job}", timeout=300)
        assert out.returncode == 2
        errors = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and f"is held by pid {os.getpid()}" in errors[0], out.stderr
        assert {p: p.stat().st_mtime_ns for p in job.rglob("*")} == before
    with rundir.hold(job), rundir.hold(job):  # free again, and re-entrant in one process
        pass


def test_atomic_writes_use_a_temp_name_per_writer(tmp_path):
    names = {rundir.temp_name(tmp_path / "last.pt") for _ in range(3)}
    assert len(names) == 3 and all(str(os.getpid()) in n.name for n in names)
    rundir.write_atomic(tmp_path / "a.txt", "x")
    rundir.save_checkpoint(tmp_path / "c" / "last.pt", {"step": 1})
    assert (tmp_path / "a.txt").read_text() == "x" and not list(tmp_path.rglob("*.tmp"))
