"""Packed LoRA: K jobs through one frozen base train as each would alone."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lora_repro.data import collate
from lora_repro.lora import apply_lora, lora_factors
from lora_repro.lora.packed import PackedJob, apply_packed_lora, job_factors, job_losses
from lora_repro.trainer import lm_loss
from tests.test_fastpath import PAD, features

# (targets, rank, alpha): the mission sweep's kinds of difference in one pack
JOBS = [("qv", 1, 16.0), ("qkvo", 4, 32.0), ("v", 2, 8.0)]


def base_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(  # no dropout: each job's draws would differ packed
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=1,
        eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def single(targets: str, rank: int, alpha: float, seed: int) -> GPT2LMHeadModel:
    model = base_model()
    torch.manual_seed(seed)  # apply_lora draws its init seed from the global RNG
    return apply_lora(model, targets, rank, alpha).train()


def packed_jobs() -> list[PackedJob]:
    jobs = []
    for seed, (targets, rank, alpha) in enumerate(JOBS):
        torch.manual_seed(seed)
        jobs.append(PackedJob(targets, rank, alpha, int(torch.randint(2**62, ()))))
    return jobs


def train(model, batches, loss, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1)
    for step in range(steps):
        loss(model, batches[step]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_each_packed_job_starts_and_trains_as_it_would_alone():
    # Job k's batch at each step; all padded to one length so they stack.
    batches = [[collate(features([9, 14, 6], seed=10 * k + s), PAD, pad_to=16)
                for s in range(3)] for k in range(len(JOBS))]
    alone = [single(*job, seed=k) for k, job in enumerate(JOBS)]
    packed = apply_packed_lora(base_model(), packed_jobs()).train()
    for k, model in enumerate(alone):  # same init
        start = job_factors(packed, k)
        assert start.keys() == lora_factors(model).keys()
        for key, (a, b) in lora_factors(model).items():
            assert torch.equal(start[key][0], a) and torch.equal(start[key][1], b)

    for k, model in enumerate(alone):
        train(model, batches[k], lambda m, b: lm_loss(m, b["input_ids"], b["labels"]))
    stacked = [{name: torch.cat([batches[k][s][name] for k in range(len(JOBS))])
                for name in ("input_ids", "labels")} for s in range(3)]
    train(packed, stacked, lambda m, b: job_losses(
        lm_loss(m, b["input_ids"], b["labels"], reduction="none"), b["labels"], len(JOBS)).sum())

    for k, model in enumerate(alone):
        got = job_factors(packed, k)
        for key, (a, b) in lora_factors(model).items():
            assert not torch.equal(b, torch.zeros_like(b))  # it trained
            torch.testing.assert_close(got[key][0], a, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got[key][1], b, rtol=1e-4, atol=1e-6)
    # Slices a job does not adapt, and rank rows past its own, are still exactly zero.
    layer = packed.transformer.h[1].attn.c_attn
    assert layer.live[0] == ["q", None, "v"] and layer.live[2] == [None, None, "v"]
    assert not layer.lora_A[0, 1].any() and not layer.lora_B[0, 1].any()  # job 0 has no k
    assert not layer.lora_A[0, :, 1:].any() and not layer.lora_B[0, :, :, 1:].any()  # r=1 of 4
    assert not packed.transformer.h[1].attn.c_proj.lora_B[0].any()  # only job 1 has o


def test_job_losses_are_each_jobs_mean_over_its_own_rows():
    labels = torch.tensor([[0, 5, 5, -100], [0, 5, -100, -100], [0, -100, -100, -100],
                           [0, 5, 5, 5]])
    losses = torch.arange(12, dtype=torch.float)  # (K*B*(T-1),), K=2, B=2, T=4
    losses = losses * (labels[:, 1:] != -100).flatten()
    want = [(0 + 1 + 3) / 3, (9 + 10 + 11) / 3]  # job 0: rows 0-1; job 1: rows 2-3
    assert job_losses(losses, labels, jobs=2).tolist() == pytest.approx(want)
