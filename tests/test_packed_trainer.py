"""Packed training (`lora_repro.packed_trainer`): K jobs trained as one give each job what it
gets alone (to float rounding, with dropout off), in its own run directory, and resume."""

import functools
import json

import pytest
import torch
import torch._dynamo

from lora_repro import fastpath, packed_trainer, rundir
from lora_repro.lora import read_adapter
from lora_repro.packed_trainer import pack_key, train_pack
from lora_repro.trainer import train
from tests.test_train import QUICK, make_cfg

JOBS = [("qv", 1), ("qkvo", 4), ("v", 2)]
# no dropout: a packed batch draws its masks once for all jobs; checkpoints at 5, 8 (epoch), 10
PACKED = [*QUICK, "dropout=0", "model.dropout=0", "checkpoint_every=5"]


def cfgs(*extra):
    return [make_cfg(*PACKED, f"targets={t}", f"rank={r}", *extra) for t, r in JOBS]


def adapter(run_dir):
    return read_adapter(run_dir / rundir.ADAPTER)[0]


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_pack_key_packs_jobs_that_differ_only_in_rank_and_targets():
    keys = [pack_key(c) for c in cfgs()]
    assert keys[0] is not None and len(set(keys)) == 1
    assert pack_key(make_cfg(*PACKED, "seed=2")) != keys[0]  # another base and batch order
    for alone in ("grad_accum=2", "max_grad_norm=1.0", "eval.base=true", "method=full"):
        assert pack_key(make_cfg(*PACKED, alone)) is None, alone


def test_a_pack_trains_each_job_as_alone_into_its_own_run_dir(tmp_path):
    jobs = cfgs()  # the pack decodes and scores its jobs; alone, they only train
    alone = [train(c, tmp_path / "alone" / f"{t}{r}")
             for c, (t, r) in zip(cfgs("eval.test=false"), JOBS, strict=True)]
    dirs = [tmp_path / "pack" / f"{t}{r}" for t, r in JOBS]
    packed = train_pack(jobs, dirs)
    for a, p, run_dir, (t, r) in zip(alone, packed, dirs, JOBS, strict=True):
        assert close(adapter(tmp_path / "alone" / f"{t}{r}"), adapter(run_dir))
        assert p["pack"] == ["qv1", "qkvo4", "v2"] and p["steps"] == a["steps"] == 12
        assert p["metrics"]["val_loss"] == pytest.approx(a["metrics"]["val_loss"], rel=1e-5)
        assert p["trainable_params"] == a["trainable_params"]
        assert "BLEU" in p["metrics"] and (run_dir / rundir.PREDICTIONS).is_file()
        rundir.verify_artifacts(run_dir, p)
        lines = [json.loads(x) for x in (run_dir / rundir.METRICS).read_text().splitlines()]
        assert [x["step"] for x in lines if "train_loss" in x] == [4, 8, 12]
    again = train_pack(jobs, dirs)  # complete: each is skipped as a job alone is
    assert [s["ended_at"] for s in again] == [s["ended_at"] for s in packed]


def test_an_interrupted_pack_resumes_as_a_pack_or_job_by_job(tmp_path, monkeypatch):
    jobs = cfgs("eval.test=false")
    whole = [tmp_path / "whole" / f"{t}{r}" for t, r in JOBS]
    train_pack(jobs, whole)

    log = packed_trainer.Tracker.log

    def crash(self, metrics, step):  # killed at step 12's log line: last.pt is at step 10
        if step == 12:
            raise KeyboardInterrupt
        log(self, metrics, step)

    for name in ("pack", "split"):
        dirs = [tmp_path / name / f"{t}{r}" for t, r in JOBS]
        monkeypatch.setattr(packed_trainer.Tracker, "log", crash)
        with pytest.raises(KeyboardInterrupt):
            train_pack(jobs, dirs)
        monkeypatch.undo()
        assert all(rundir.load_checkpoint(d / rundir.CHECKPOINT)["step"] == 10 for d in dirs)
        assert not any((d / rundir.SUMMARY).exists() for d in dirs)
    dirs = [tmp_path / "pack" / f"{t}{r}" for t, r in JOBS]
    for summary in train_pack(jobs, dirs):  # the same pack again: from step 10
        assert summary["steps"] == 12
    # bit for bit: the optimizer state went through the checkpoints exactly
    for d, w in zip(dirs, whole, strict=True):
        assert adapter(d).keys() == adapter(w).keys()
        assert all(torch.equal(adapter(d)[k], adapter(w)[k]) for k in adapter(w))
    # each job alone, from its pack checkpoint (the single-job format)
    for cfg, (t, r), w in zip(jobs, JOBS, whole, strict=True):
        d = tmp_path / "split" / f"{t}{r}"
        assert train(cfg, d)["steps"] == 12
        assert close(adapter(d), adapter(w))


def test_a_pack_on_the_fast_path_compiles_once_and_trains_as_the_plain_pack(tmp_path,
                                                                            monkeypatch):
    """compile=true (CUDA's default) on CPU with the aot_eager backend: the packed loss (one
    per job) warms up every (K x batch, length) shape and trains as uncompiled."""
    jobs = cfgs("eval.test=false")
    plain = [tmp_path / "plain" / f"{t}{r}" for t, r in JOBS]
    train_pack(jobs, plain)
    monkeypatch.setattr(fastpath, "compile_loss",
                        functools.partial(fastpath.compile_loss, backend="aot_eager"))
    torch._dynamo.reset()
    fast = [tmp_path / "fast" / f"{t}{r}" for t, r in JOBS]
    summaries = train_pack(cfgs("eval.test=false", "compile=true"), fast)
    torch._dynamo.reset()
    assert all(s["compile_s"] is not None for s in summaries)
    for a, b in zip(plain, fast, strict=True):
        assert close(adapter(a), adapter(b))


@pytest.mark.gpu
def test_a_pack_trains_on_cuda_with_one_graph_and_as_on_cpu(tmp_path):
    """The fast path on CUDA (inductor, CUDA graphs, bf16): the pack's warm-up records every
    shape with one compile, and training gives the CPU pack's adapters up to bf16's
    rounding (each factor's direction)."""
    from torch._dynamo.utils import counters

    jobs = cfgs("eval.test=false")
    cpu = [tmp_path / "cpu" / f"{t}{r}" for t, r in JOBS]
    train_pack(jobs, cpu)
    torch._dynamo.reset()
    counters.clear()
    gpu = [tmp_path / "gpu" / f"{t}{r}" for t, r in JOBS]
    summaries = train_pack(cfgs("eval.test=false", "device=cuda"), gpu)
    assert counters["stats"]["unique_graphs"] == 1
    assert all(s["compile_s"] is not None and s["steps"] == 12 for s in summaries)
    for a, b in zip(cpu, gpu, strict=True):  # the same directions, to bf16's rounding
        x, y = adapter(a), adapter(b)
        assert x.keys() == y.keys()
        assert all(torch.cosine_similarity(x[k].flatten(), y[k].flatten(), dim=0) > 0.98
                   for k in x)
