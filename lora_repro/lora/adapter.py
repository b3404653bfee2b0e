"""Adapter files: A and B of every adapted (layer, matrix) in one safetensors file.

Layout (tensors, float32):

    h.{layer}.{letter}.lora_A   (r, d_in)
    h.{layer}.{letter}.lora_B   (d_out, r)

Metadata (strings): format, targets, rank, alpha, dropout, base_model (hub id or path),
n_layer, n_embd, n_inner. dW of an entry is (alpha / r) * lora_B @ lora_A.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lora_repro.errors import UserError
from lora_repro.lora.model import (
    _require_lora,
    apply_lora,
    base_weights,
    lora_factors,
    lora_layers,
    lora_settings,
)
from lora_repro.lora.targets import blocks, parse_targets

FORMAT = "lora-repro-adapter/1"


def _shape_meta(model: nn.Module) -> dict[str, int]:
    config = model.config
    n_inner = getattr(config, "n_inner", None) or 4 * config.n_embd
    return {"n_layer": len(blocks(model)), "n_embd": config.n_embd, "n_inner": n_inner}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's LoRA factors and settings to `path` (atomically: a reader never sees
    a half-written file). Returns the path."""
    _require_lora(model)
    settings = lora_settings(model)
    tensors = {
        f"h.{i}.{letter}.lora_{name}": t.float().contiguous().cpu()
        for (i, letter), (a, b) in lora_factors(model).items()
        for name, t in (("A", a), ("B", b))
    }
    meta = {
        "format": FORMAT,
        "targets": settings.targets,
        "rank": str(settings.rank),
        "alpha": str(settings.alpha),
        "dropout": str(settings.dropout),
        "base_model": str(getattr(model.config, "name_or_path", "") or ""),
        **{k: str(v) for k, v in _shape_meta(model).items()},
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter file without a model: (tensors by key, metadata).

    `path` may also be a peft LoRA adapter directory or Hub id ("user/name"), converted by
    `lora_repro.lora.peft_files.read_peft` (metadata "source": "peft").

    Raises `UserError` for a missing, truncated or non-safetensors file, or a safetensors
    file that is not a lora-repro adapter.
    """
    if not Path(path).is_file():
        from lora_repro.lora.peft_files import read_peft  # it imports this module

        if Path(path).is_dir() or not Path(path).exists():
            return read_peft(path)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"adapter file {path} is not a readable safetensors file ({reason})") from e
    if meta.get("format") != FORMAT:
        raise UserError(f"adapter file {path} is not a lora-repro adapter (format {FORMAT!r})")
    return tensors, meta


def adapter_factors(
    tensors: dict[str, torch.Tensor], meta: dict[str, str]
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """A (r x d_in) and B (d_out x r) per (layer, letter) from `read_adapter`'s output."""
    return {
        (i, letter): (tensors[f"h.{i}.{letter}.lora_A"], tensors[f"h.{i}.{letter}.lora_B"])
        for i in range(int(meta["n_layer"]))
        for letter in meta["targets"]
    }


def load_adapter(
    model: nn.Module, path: str | os.PathLike, dropout: float | None = None
) -> nn.Module:
    """Load an adapter file (or a peft adapter directory / Hub id) into `model`, in place,
    and return the model.

    A plain GPT-2 first gets `apply_lora` with the file's settings (`dropout` overrides the
    saved dropout, e.g. 0 for inference); a model that already has LoRA must have the same
    targets, rank and alpha. Every check (model shape, settings, each tensor's presence and
    shape) runs before the model is touched; a failure is one `UserError` line.
    """
    tensors, meta = read_adapter(path)
    if any(m.merged for _, m in lora_layers(model)):
        raise UserError("the model's LoRA is merged: call unmerge_lora before load_adapter")
    shape = {k: str(v) for k, v in _shape_meta(model).items()}
    for key, value in shape.items():
        if meta.get(key, value) != value:  # a peft adapter without MLP targets has no n_inner
            raise UserError(
                f"adapter {path} was trained on a model with {key}={meta.get(key)}, "
                f"this model has {key}={value}"
            )
    targets, rank, alpha = parse_targets(meta["targets"]), int(meta["rank"]), float(meta["alpha"])
    settings = lora_settings(model)
    if settings is not None and (settings.targets, settings.rank, settings.alpha) != (
            targets, rank, alpha):
        raise UserError(
            f"adapter {path} has targets={targets!r} rank={rank} alpha={alpha:g}, the model's "
            f"LoRA has targets={settings.targets!r} rank={settings.rank} "
            f"alpha={settings.alpha:g}"
        )
    try:
        factors = adapter_factors(tensors, meta)
    except KeyError as e:
        raise UserError(f"adapter {path} lacks tensor {e.args[0]}") from None
    for (i, letter), w in base_weights(model, targets).items():  # W: d_out x d_in
        expected = {"A": (rank, w.shape[1]), "B": (w.shape[0], rank)}
        for name, tensor in zip("AB", factors[(i, letter)], strict=True):
            if tuple(tensor.shape) != expected[name]:
                raise UserError(
                    f"adapter {path}: h.{i}.{letter}.lora_{name} is {tuple(tensor.shape)}, "
                    f"the model expects {expected[name]}"
                )
    if settings is None:
        apply_lora(model, targets, rank, alpha, float(meta["dropout"]) if dropout is None
                   else dropout)
    with torch.no_grad():
        for key, (a, b) in lora_factors(model).items():
            a.copy_(factors[key][0])
            b.copy_(factors[key][1])
    return model
