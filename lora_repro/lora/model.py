"""Whole-model LoRA operations on a Hugging Face GPT-2: apply, merge, and read weights back.

Keys of every returned dict are ``(layer, letter)``: layer is 0-based, letter one of
``q k v o f p`` (see `lora_repro.lora.targets`). Every matrix is d_out x d_in (`nn.Linear`
convention), never Conv1D's transpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lora_repro.errors import UserError
from lora_repro.lora.layer import LoRAConv1D, init_seed
from lora_repro.lora.targets import (
    TARGETS,
    blocks,
    conv1d_slice_as_linear,
    group_by_module,
    parse_targets,
)

Key = tuple[int, str]


@dataclass(frozen=True)
class LoRASettings:
    """What `apply_lora` was called with (read back from the model's layers)."""

    targets: str
    rank: int
    alpha: float
    dropout: float


def _get(block: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        block = getattr(block, name)
    return block


def _set(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(block, parent) if parent else block, name, module)


def _conv(block: nn.Module, path: str) -> nn.Module:
    """The original `Conv1D` at `path`, whether or not LoRA wraps it."""
    module = _get(block, path)
    return module.base if isinstance(module, LoRAConv1D) else module


def lora_layers(model: nn.Module) -> list[tuple[int, LoRAConv1D]]:
    """Every `LoRAConv1D` of the model with its 0-based layer index, in layer order."""
    return [
        (i, m) for i, block in enumerate(blocks(model)) for m in block.modules()
        if isinstance(m, LoRAConv1D)
    ]


def lora_settings(model: nn.Module) -> LoRASettings | None:
    """The model's LoRA settings, or None if `apply_lora` was never called on it."""
    layers = lora_layers(model)
    if not layers:
        return None
    first = [m for i, m in layers if i == 0]
    targets = parse_targets("".join(m.letters for m in first))
    m = first[0]
    p = m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0
    return LoRASettings(targets=targets, rank=m.rank, alpha=m.alpha, dropout=p)


def _validate(model: nn.Module, targets: str, rank: int, alpha: float, dropout: float) -> str:
    h = blocks(model)
    targets = parse_targets(targets)
    if lora_settings(model) is not None:
        raise UserError(f"the model already has LoRA ({lora_settings(model)}); apply it once")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UserError(f"rank={rank!r}: must be an integer >= 1")
    for letter in targets:
        t = TARGETS[letter]
        w = conv1d_slice_as_linear(_conv(h[0], t.module).weight, t)
        if rank > min(w.shape):
            raise UserError(
                f"rank={rank}: must be <= min(d_out, d_in) = {min(w.shape)} for target {letter!r}"
            )
    if not alpha > 0:
        raise UserError(f"alpha={alpha!r}: must be > 0")
    if not 0 <= dropout < 1:
        raise UserError(f"dropout={dropout!r}: must be in [0, 1)")
    return targets


def apply_lora(
    model: nn.Module, targets: str, rank: int, alpha: float, dropout: float = 0.0
) -> nn.Module:
    """Add LoRA to the chosen matrices of every block of a GPT-2 model, in place.

    Every targeted matrix W (d_out x d_in) gets dW = (alpha / rank) * B @ A with
    A (rank x d_in) Kaiming-uniform and B (d_out x rank) zero, and dropout on the LoRA
    branch's input (paper Section 4; init as in its code, loralib). All base weights and
    biases are frozen; only A and B train. Untargeted slices of ``c_attn`` (k under "qv")
    get no parameters and no compute.

    Each A is drawn from its own generator, seeded by (one draw of the global RNG, rank,
    layer, matrix). loralib draws every A from the global stream instead, so two runs with
    one seed at ranks 8 and 64 start with A_8 equal to the first 8 rows of A_64 in the first
    adapted matrix, which inflates the subspace similarity of Figure 3 there.

    Args:
        model: a `GPT2LMHeadModel` (or `GPT2Model`) of any size.
        targets: letters from "qkvo" (attention, the paper's notation) and "fp" (MLP c_fc and
            c_proj), e.g. "qv".
        rank: r >= 1, at most min(d_out, d_in) of every targeted matrix.
        alpha: the LoRA alpha > 0; the update is scaled by alpha / rank.
        dropout: dropout probability in [0, 1) on the LoRA branch.

    Returns:
        The same model object.
    """
    targets = _validate(model, targets, rank, alpha, dropout)
    for p in model.parameters():
        p.requires_grad_(False)
    base_seed = int(torch.randint(2**62, ()))
    for layer, block in enumerate(blocks(model)):
        for path, group in group_by_module(targets).items():
            seeds = [init_seed(base_seed, rank, layer, t.letter) for t in group]
            _set(block, path, LoRAConv1D(_get(block, path), group, rank, alpha, dropout, seeds))
    return model


def _require_lora(model: nn.Module) -> list[tuple[int, LoRAConv1D]]:
    layers = lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA layers: call apply_lora or load_adapter first")
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every dW into its base weight (W <- W + dW). The merged model runs at the base
    model's speed, and `save_pretrained` of `unwrap_lora(model)` is a plain GPT-2 checkpoint.

    Merging checks dW for NaN/inf first and leaves the weights untouched if it finds any."""
    layers = [m for _, m in _require_lora(model) if not m.merged]
    for m in layers:
        if not torch.isfinite(m.delta()).all():
            raise UserError("LoRA weights hold NaN or inf: refusing to merge them into the model")
    for m in layers:
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora` (W <- W - dW, exact up to float rounding)."""
    for _, m in _require_lora(model):
        if m.merged:
            m.unmerge()
    return model


def unwrap_lora(model: nn.Module) -> nn.Module:
    """Merge and replace every `LoRAConv1D` by its plain `Conv1D`, in place: the result is an
    ordinary GPT-2 whose `save_pretrained` loads without this package."""
    merge_lora(model)
    for block in blocks(model):
        for path in {t.module for t in TARGETS.values()}:
            module = _get(block, path)
            if isinstance(module, LoRAConv1D):
                _set(block, path, module.base)
    return model


def lora_factors(model: nn.Module) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
    """A (r x d_in) and B (d_out x r) of every adapted (layer, matrix), detached views."""
    return {
        (i, t.letter): (m.lora_A[s].detach(), m.lora_B[s].detach())
        for i, m in _require_lora(model)
        for s, t in enumerate(m.targets)
    }


def delta_weights(
    model: nn.Module, base: nn.Module | None = None, targets: str = "qkvo"
) -> dict[Key, torch.Tensor]:
    """dW (d_out x d_in) per (layer, matrix).

    LoRA (no `base`): dW = (alpha / r) B A of every adapted matrix. Full fine-tuning: pass the
    pre-trained `base`, and get dW = W_model - W_base for the matrices in `targets`.
    """
    if base is not None:
        tuned, start = base_weights(model, targets), base_weights(base, targets)
        return {key: tuned[key] - start[key] for key in tuned}
    return {
        (i, t.letter): d
        for i, m in _require_lora(model)
        for t, d in zip(m.targets, m.delta().detach(), strict=True)
    }


def base_weights(model: nn.Module, targets: str | None = None) -> dict[Key, torch.Tensor]:
    """The frozen base W (d_out x d_in) of every (layer, matrix) in `targets`.

    `targets` defaults to the model's LoRA targets. On a merged model dW is subtracted
    again, so this always returns the pre-trained W_0 (up to float rounding). Works on a
    plain GPT-2 too (e.g. a fully fine-tuned one), given `targets`.
    """
    settings = lora_settings(model)
    if targets is None:
        if settings is None:
            raise UserError("base_weights: the model has no LoRA layers; pass targets, e.g. 'qkvo'")
        targets = settings.targets
    deltas = delta_weights(model) if settings is not None else {}
    out = {}
    for i, block in enumerate(blocks(model)):
        for letter in parse_targets(targets):
            t = TARGETS[letter]
            w = conv1d_slice_as_linear(_conv(block, t.module).weight, t).detach().clone()
            module = _get(block, t.module)
            if isinstance(module, LoRAConv1D) and module.merged and (i, letter) in deltas:
                w = (w.float() - deltas[(i, letter)].float()).to(w.dtype)
            out[(i, letter)] = w
    return out


def count_trainable(model: nn.Module) -> int:
    """Number of trainable parameters (for LoRA: the sum of r * (d_in + d_out) per matrix)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
