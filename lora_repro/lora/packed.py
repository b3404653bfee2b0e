"""Packed LoRA: the adapters of K sweep jobs trained together through one frozen GPT-2.

A sweep's jobs share the frozen base and differ only in their adapters (rank, targets, init).
Alone, a job at the paper's setting (GPT-2 Medium, batch 8) is a chain of ~1,000 small
kernels (bench/RESULTS.md, "Step profile"), and jobs in separate processes only take turns
at them. Packed, the K jobs' batches stack into one (K * B, T) batch: the base runs its
kernels once for all K, on K times the rows, and each job's rows meet only its own adapter.

Layout: job k owns rows [k * B, (k + 1) * B) of the batch. A packed layer wraps one `Conv1D`
with n equal output slices (3 for c_attn: q, k, v; 1 for c_proj: o) and holds

    lora_A: (K, n, r_max, d_in)     lora_B: (K, n, d_out, r_max)     scaling: (K,)

Job k's slice s is live if s is one of its targets, with its rank r_k <= r_max in the first
r_k rows of A and columns of B. Everything else starts at zero and stays zero: a zero row of
A meets a zero column of B, so both get zero gradients, and AdamW (weight decay included)
leaves zeros at zero. So with one shared AdamW and the sum of `job_losses` (the jobs' own
mean losses), each job's factors follow the updates they would get alone, up to float
rounding (other matmul shapes) and dropout (drawn once for the packed batch, not per job).

Why hand-written: peft's mixed-adapter batches serve inference (one adapter name per row)
and cannot hold per-slice targets of GPT-2's fused c_attn (see `layer.py`).

`lora_repro.packed_trainer` trains a sweep's packs with it (`hydra.launcher.pack`). Measured
(`bench.packed_step`, one H200, GPT-2 Medium shape, E2E, batch 8 per job): the 10 jobs of
the mission sweep packed step in 33.4 ms, 135k real tokens/s together, against 6.0 ms and
75k for one job alone and 85k for 10 separate processes under MPS. The frozen base's own
work for those 10 x 8 rows steps at 171-175k: the adapters add about 20%.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lora_repro.data.encoding import IGNORE_INDEX
from lora_repro.lora.layer import init_seed
from lora_repro.lora.model import Key, _get, _set, _validate, apply_lora, lora_layers
from lora_repro.lora.targets import TARGETS, blocks, group_by_module


@dataclass(frozen=True)
class PackedJob:
    """One job's adapter: what `apply_lora` takes, and the seed its A matrices come from
    (`apply_lora` draws it from the global RNG; pass the same draw to get the same init)."""

    targets: str
    rank: int
    alpha: float
    base_seed: int


class PackedLoRAConv1D(nn.Module):
    """A frozen `Conv1D` with the LoRA updates of K jobs, job k on rows k * B .. (k+1) * B - 1.

        y = x @ W_conv + b                                            (K*B, T, n*d_out), frozen
        y[job k rows, slice s] += scaling_k * dropout(x_k) @ A_ks^T @ B_ks^T
    """

    def __init__(self, base: nn.Module, n_slices: int, letters: Sequence[str],
                 jobs: Sequence[PackedJob], layer: int, dropout: float):
        super().__init__()
        d_in, d_total = base.weight.shape  # Conv1D stores (d_in, d_out)
        self.base, self.n_slices, self.d_in, self.d_out = base, n_slices, d_in, d_total // n_slices
        self.jobs = list(jobs)
        r_max = max(job.rank for job in jobs)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.zeros(len(jobs), n_slices, r_max, d_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(len(jobs), n_slices, self.d_out, r_max, **factory))
        scaling = torch.tensor([job.alpha / job.rank for job in jobs], **factory)
        self.register_buffer("scaling", scaling, persistent=False)
        # live[k][s]: the letter of job k's slice s, or None where job k does not adapt it
        self.live = [[letter if letter in job.targets else None for letter in letters]
                     for job in jobs]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._init(layer)
        self.train(base.training)

    @torch.no_grad()
    def _init(self, layer: int) -> None:
        """Each live A as `LoRAConv1D` draws it for that job alone: same seed, same numbers."""
        bound = 1.0 / math.sqrt(self.d_in)
        for k, job in enumerate(self.jobs):
            for s, letter in enumerate(self.live[k]):
                if letter is not None:
                    g = torch.Generator().manual_seed(
                        init_seed(job.base_seed, job.rank, layer, letter))
                    a = torch.empty(job.rank, self.d_in).uniform_(-bound, bound, generator=g)
                    self.lora_A[k, s, :job.rank].copy_(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (K*B, ..., n * d_out)
        k, n, r = self.lora_A.shape[:3]
        xs = self.dropout(x).reshape(k, -1, self.d_in)  # (K, rows, d_in)
        h = xs @ self.lora_A.reshape(k, n * r, self.d_in).transpose(1, 2)  # (K, rows, n*r)
        # Slice by slice, concatenated along the features: y's own layout. (One batched
        # matmul over (K, n) needs a (K, n, rows, d_out) -> (K, rows, n, d_out) transpose,
        # forward and backward; compiled, that one kernel took 15% of a 10-job step.)
        # (One baddbmm of a block-diagonal B accumulating into y, tried on an H200, was slower
        # than this concatenation and add: 34.3 against 33.4 ms for 10 jobs; bench/RESULTS.md)
        delta = torch.cat([h[..., s * r:(s + 1) * r] @ self.lora_B[:, s].transpose(1, 2)
                           for s in range(n)], dim=-1)  # (K, rows, n*d_out)
        # scaled in delta's dtype, as a job alone scales it (bf16 under autocast): an fp32
        # scaling would promote the update, and with it the layer's output, to fp32
        scaling = self.scaling.to(delta.dtype)[:, None, None]
        return y + (delta * scaling).reshape(y.shape)

    def factors(self, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Job k's live (A (r_k, d_in), B (d_out, r_k)) per target letter, detached views."""
        r = self.jobs[k].rank
        return {letter: (self.lora_A[k, s, :r].detach(), self.lora_B[k, s, :, :r].detach())
                for s, letter in enumerate(self.live[k]) if letter is not None}


def apply_packed_lora(model: nn.Module, jobs: Sequence[PackedJob],
                      dropout: float = 0.0) -> nn.Module:
    """Wrap, in place, every `Conv1D` that some job targets in a `PackedLoRAConv1D` for all
    `jobs`; freeze the rest. Each job is checked as `apply_lora` checks it."""
    for job in jobs:
        _validate(model, job.targets, job.rank, job.alpha, dropout)
    union = "".join(sorted({c for job in jobs for c in job.targets}))
    for p in model.parameters():
        p.requires_grad_(False)
    for layer, block in enumerate(blocks(model)):
        for path, group in group_by_module(union).items():
            n = group[0].n_slices
            letters = [next(t.letter for t in TARGETS.values()
                            if t.module == path and t.slice_index == s) for s in range(n)]
            _set(block, path, PackedLoRAConv1D(_get(block, path), n, letters, jobs, layer,
                                               dropout))
    return model


def unpack(model: nn.Module, dropout: float = 0.0) -> Iterator[nn.Module]:
    """Each job of a packed model in turn, as the model a job alone trains (`apply_lora`'s
    layers, on a copy of the frozen base) holding that job's factors. `model` itself
    becomes the plain base. A copy each: decoding merges the adapter into its base."""
    jobs = next(m for m in model.modules() if isinstance(m, PackedLoRAConv1D)).jobs
    factors = [{key: (a.clone(), b.clone()) for key, (a, b) in job_factors(model, k).items()}
               for k in range(len(jobs))]
    for block in blocks(model):
        for path in {t.module for t in TARGETS.values()}:
            if isinstance(module := _get(block, path), PackedLoRAConv1D):
                _set(block, path, module.base)
    for job, found in zip(jobs, factors, strict=True):
        single = apply_lora(copy.deepcopy(model), job.targets, job.rank, job.alpha, dropout)
        with torch.no_grad():
            for layer, m in lora_layers(single):
                for s, target in enumerate(m.targets):
                    a, b = found[(layer, target.letter)]
                    m.lora_A[s].copy_(a)
                    m.lora_B[s].copy_(b)
        yield single


def job_factors(model: nn.Module, k: int) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
    """Job k's (A, B) per (layer, letter), as `lora_factors` gives them for a job alone."""
    out = {}
    for layer, block in enumerate(blocks(model)):
        for m in block.modules():
            if isinstance(m, PackedLoRAConv1D):
                out.update({(layer, letter): f for letter, f in m.factors(k).items()})
    return out


def job_losses(token_losses: torch.Tensor, labels: torch.Tensor, jobs: int) -> torch.Tensor:
    """(K,): each job's mean token loss. The gradient of their sum for job k's factors is
    that of job k's loss alone.

    Args:
        token_losses: (K*B*(T-1),) per-token losses, 0 where ignored (`lm_loss` with
            reduction="none").
        labels: (K*B, T), IGNORE_INDEX where no loss.
        jobs: K.
    """
    counts = (labels[:, 1:] != IGNORE_INDEX).reshape(jobs, -1).sum(1)  # (K,)
    return token_losses.reshape(jobs, -1).sum(1) / counts.clamp(min=1)


Index = tuple  # indexes a packed parameter: job k's part of it


def job_slices(model: nn.Module, k: int) -> list[tuple[str, nn.Parameter, Index]]:
    """Job k's parameters as a job alone names and orders them (`apply_lora`, the trainer's
    checkpoints): (name, the packed parameter, the index of job k's part in it). A job alone
    has lora_A (k_live, r, d_in) and lora_B (k_live, d_out, r) in each module it adapts,
    at the same module path as the packed layer."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, PackedLoRAConv1D):
            live = [s for s, letter in enumerate(m.live[k]) if letter is not None]
            if live:
                r = m.jobs[k].rank
                out.append((f"{path}.lora_A", m.lora_A, (k, live, slice(0, r))))
                out.append((f"{path}.lora_B", m.lora_B, (k, live, slice(None), slice(0, r))))
    return out


def job_state(model: nn.Module, optimizer: torch.optim.Optimizer, k: int) -> tuple[dict, dict]:
    """Job k's (trainable state, optimizer state_dict) in the format of a job alone, so that
    its checkpoint resumes as a job alone or in a pack. `optimizer`: one AdamW over the
    packed model's trainable parameters, in the groups the trainer makes (the LoRA factors
    in the first)."""
    slices = job_slices(model, k)
    # (indexing by the list of live slices copies: nothing here shares the packed storage)
    trainable = {name: p.detach()[index].cpu() for name, p, index in slices}
    full = optimizer.state_dict()
    ids = _param_ids(optimizer)
    state = {}
    for j, (_, p, index) in enumerate(slices):
        saved = full["state"].get(ids[id(p)])
        if saved:
            state[j] = {key: value.clone() if key == "step" else value[index].cpu()
                        for key, value in saved.items()}
    groups = [{**group, "params": list(range(len(slices))) if g == 0 else []}
              for g, group in enumerate(full["param_groups"])]
    return trainable, {"state": state, "param_groups": groups}


def load_job_states(model: nn.Module, optimizer: torch.optim.Optimizer,
                    states: list[tuple[dict, dict]]) -> None:
    """The inverse of `job_state` for every job at once: job k's (trainable, optimizer
    state) into its parts of the packed parameters and of the optimizer's moments."""
    ids = _param_ids(optimizer)
    full = optimizer.state_dict()
    moments: dict[int, dict] = {}
    with torch.no_grad():
        for k, (trainable, opt_state) in enumerate(states):
            for j, (name, p, index) in enumerate(job_slices(model, k)):
                p[index] = trainable[name].to(p)
                saved = opt_state["state"].get(j)
                if saved:
                    m = moments.setdefault(ids[id(p)], {"step": saved["step"].clone()})
                    for key in ("exp_avg", "exp_avg_sq"):
                        m.setdefault(key, torch.zeros(p.shape, dtype=p.dtype))[index] = \
                            saved[key].to(p.dtype)
    # the saved groups' settings (the lr where training stopped), with the packed params
    groups = [{**saved, "params": group["params"]}
              for saved, group in zip(states[0][1]["param_groups"], full["param_groups"],
                                      strict=True)]
    optimizer.load_state_dict({"state": moments, "param_groups": groups})


def _param_ids(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(parameter) -> its number in `optimizer.state_dict()`."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {id(p): i for i, p in enumerate(params)}

