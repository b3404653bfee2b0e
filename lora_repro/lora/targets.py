"""Where each LoRA target letter lives inside a Hugging Face GPT-2 block.

Hugging Face GPT-2 fuses the query, key and value projections into one `Conv1D`,
``attn.c_attn`` (d_model -> 3 * d_model), and every `Conv1D` stores its weight transposed
relative to `nn.Linear`: ``conv.weight`` is (d_in, d_out) and computes ``x @ weight + bias``.
This module is the only place that knows both facts; everything else speaks of matrices
W (d_out x d_in) in the `nn.Linear` convention, as the paper does.

Target letters (the paper's notation, plus two MLP letters of ours):

    q  attn.c_attn, output slice 0 of 3   (W_q, d_model x d_model)
    k  attn.c_attn, output slice 1 of 3   (W_k)
    v  attn.c_attn, output slice 2 of 3   (W_v)
    o  attn.c_proj                        (W_o, d_model x d_model)
    f  mlp.c_fc                           (MLP up-projection, d_inner x d_model)
    p  mlp.c_proj                         (MLP down-projection, d_model x d_inner)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lora_repro.errors import UserError


@dataclass(frozen=True)
class Target:
    """One adaptable matrix: a slice of a `Conv1D`'s output features."""

    letter: str
    module: str  # path inside a GPT2Block, e.g. "attn.c_attn"
    slice_index: int  # which of the `n_slices` equal output slices
    n_slices: int


TARGETS: dict[str, Target] = {
    "q": Target("q", "attn.c_attn", 0, 3),
    "k": Target("k", "attn.c_attn", 1, 3),
    "v": Target("v", "attn.c_attn", 2, 3),
    "o": Target("o", "attn.c_proj", 0, 1),
    "f": Target("f", "mlp.c_fc", 0, 1),
    "p": Target("p", "mlp.c_proj", 0, 1),
}
ALLOWED = "".join(TARGETS)


def parse_targets(targets: str) -> str:
    """Validate a target string such as "qv" and return it in canonical order ("qkvofp").

    Raises `UserError` for an empty string, unknown letters or repeated letters.
    """
    if not isinstance(targets, str) or not targets:
        raise UserError(f"targets={targets!r}: give at least one letter of {ALLOWED!r}, e.g. 'qv'")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise UserError(
            f"targets={targets!r}: unknown letter(s) {''.join(unknown)!r}; allowed: "
            f"q k v o (attention), f p (MLP)"
        )
    if len(set(targets)) != len(targets):
        raise UserError(f"targets={targets!r}: a letter appears twice")
    return "".join(letter for letter in TARGETS if letter in targets)


def group_by_module(targets: str) -> dict[str, list[Target]]:
    """Group canonical targets by the `Conv1D` they live in, e.g. "qvo" ->
    {"attn.c_attn": [q, v], "attn.c_proj": [o]}."""
    groups: dict[str, list[Target]] = {}
    for letter in parse_targets(targets):
        target = TARGETS[letter]
        groups.setdefault(target.module, []).append(target)
    return groups


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a `GPT2LMHeadModel` or `GPT2Model`.

    Raises `UserError` for a model that is not GPT-2-shaped.
    """
    body = getattr(model, "transformer", model)
    h = getattr(body, "h", None)
    if not isinstance(h, nn.ModuleList) or len(h) == 0 or not hasattr(h[0], "attn"):
        raise UserError(
            f"model {type(model).__name__} is not GPT-2-shaped: expected a GPT2LMHeadModel "
            "(transformer.h[i].attn.c_attn)"
        )
    return h


def conv1d_slice_as_linear(weight: torch.Tensor, target: Target) -> torch.Tensor:
    """The (d_out x d_in) matrix of `target` from a `Conv1D` weight of shape (d_in, n * d_out).

    Returns a view (a transposed slice), so in-place edits reach the `Conv1D` weight.
    """
    d_in, d_total = weight.shape
    assert d_total % target.n_slices == 0, (weight.shape, target)
    d_out = d_total // target.n_slices
    cols = slice(target.slice_index * d_out, (target.slice_index + 1) * d_out)
    return weight[:, cols].T
