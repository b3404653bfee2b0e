"""The LoRA layer: a frozen GPT-2 `Conv1D` plus low-rank updates on chosen output slices.

Why hand-written: peft can only adapt the whole fused ``c_attn`` of Hugging Face GPT-2, so
adapting W_q and W_v but not W_k (the paper's main setting) is impossible there. This layer
does what loralib's ``MergedLinear(enable_lora=[True, False, True])`` does in the paper's
code: untargeted slices get no parameters and no compute.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from lora_repro.lora.targets import Target, conv1d_slice_as_linear


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The LoRA update dW = (alpha / r) * B @ A (paper, Eq. 3 and Section 4.1).

    Args:
        lora_A: (..., r, d_in).
        lora_B: (..., d_out, r).
        scaling: alpha / r.

    Returns:
        dW: (..., d_out, d_in), the `nn.Linear` convention. This is the only place dW is
        computed: forward (implicitly), merge, unmerge, export and analysis all use it.
    """
    return scaling * (lora_B @ lora_A)


def init_seed(base: int, rank: int, layer: int, letter: str) -> int:
    """The seed of one matrix's A: a stable hash of (base seed, rank, layer, matrix letter)."""
    digest = hashlib.sha256(f"{base}:{rank}:{layer}:{letter}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class LoRAConv1D(nn.Module):
    """A frozen `Conv1D` with LoRA on `k` of its `n` equal output slices.

    For the fused ``c_attn`` (n = 3 slices q, k, v) with targets q and v, k = 2:

        y = x @ W_conv + b                                     (..., n * d_out), frozen
        y[..., slice s] += scaling * dropout(x) @ A_s^T @ B_s^T for each enabled slice s

    Parameters (the only trainable ones):
        lora_A: (k, r, d_in), Kaiming-uniform as in loralib, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)),
            slice i drawn from its own generator seeded by `init_seeds[i]`.
        lora_B: (k, d_out, r), zero, so the adapted model starts equal to the base model.
    """

    def __init__(
        self, base: nn.Module, targets: list[Target], rank: int, alpha: float, dropout: float,
        init_seeds: Sequence[int],
    ):
        super().__init__()
        n_slices = targets[0].n_slices
        d_in, d_total = base.weight.shape  # Conv1D stores (d_in, d_out)
        assert d_total % n_slices == 0 and all(t.n_slices == n_slices for t in targets)
        self.base = base
        self.targets = targets
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.n_slices, self.d_in, self.d_out = n_slices, d_in, d_total // n_slices
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        index = torch.tensor([t.slice_index for t in targets], device=base.weight.device)
        self.register_buffer("slice_index", index, persistent=False)
        self.lora_A = nn.Parameter(torch.empty(len(targets), rank, d_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(len(targets), self.d_out, rank, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_parameters(init_seeds)
        self.train(base.training)  # a new module defaults to training mode; follow the model

    @property
    def letters(self) -> str:
        return "".join(t.letter for t in self.targets)

    @torch.no_grad()
    def reset_parameters(self, init_seeds: Sequence[int]) -> None:
        # kaiming_uniform_(a=sqrt(5)) on an (r, d_in) matrix, as loralib does: bound 1/sqrt(d_in).
        bound = 1.0 / math.sqrt(self.d_in)
        for a, seed in zip(self.lora_A, init_seeds, strict=True):
            g = torch.Generator().manual_seed(seed)
            a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=g))
        nn.init.zeros_(self.lora_B)

    def delta(self) -> torch.Tensor:
        """dW of every enabled slice: (k, d_out, d_in)."""
        return delta_weight(self.lora_A, self.lora_B, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., n * d_out)
        if self.merged:
            return y
        k, r = self.lora_A.shape[:2]
        # Two matmuls for all enabled slices together (not two per slice): x @ [A_1; ...; A_k]^T,
        # then @ blockdiag(B_1, ..., B_k)^T. The off-diagonal zeros cost k * r * d_out extra
        # multiply-adds per token, negligible next to the base layer's d_in * n * d_out.
        h = self.dropout(x) @ self.lora_A.reshape(k * r, self.d_in).T  # (..., k * r)
        delta = h @ torch.block_diag(*self.lora_B).T  # (..., k * d_out)
        if k == self.n_slices:  # every slice adapted, in order
            return y + self.scaling * delta
        y = y.unflatten(-1, (self.n_slices, self.d_out))  # (..., n, d_out)
        delta = delta.unflatten(-1, (k, self.d_out))  # (..., k, d_out)
        return y.index_add(-2, self.slice_index, delta, alpha=self.scaling).flatten(-2)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold dW into the base weight: afterwards the layer runs at the base layer's speed."""
        self._add_delta(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract dW from the base weight again (inverse of `merge`, up to rounding)."""
        self._add_delta(-1.0)
        self.merged = False

    def _add_delta(self, sign: float) -> None:
        delta = self.delta().float()
        for target, d in zip(self.targets, delta, strict=True):
            w = conv1d_slice_as_linear(self.base.weight, target)  # (d_out, d_in) view
            w.copy_((w.float() + sign * d).to(w.dtype))

    def extra_repr(self) -> str:
        return (
            f"targets={self.letters!r}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"
        )
