"""peft adapter directories on disk: read one (local or a Hub id) as a lora-repro adapter,
write a lora-repro adapter as one. The math is in `lora_repro.lora.peft_format`.

A peft adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
(or an older ``adapter_model.bin``). An export by lora-repro adds ``lora_repro.json``: the
source run's config and base fingerprint, so the analysis pairs it with lora-repro runs.
peft itself is not needed for either direction.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora_repro.errors import UserError
from lora_repro.lora.peft_format import (
    SVD_NOTE,
    export_layout,
    from_peft,
    peft_config,
    to_peft,
)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
ORIGIN = "lora_repro.json"
_noted: set[str] = set()


def is_peft_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG).is_file()


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))
            and not name.endswith((".safetensors", ".bin", ".json", ".pt")))


def resolve(source: str | os.PathLike) -> Path:
    """A local peft adapter directory for `source`: a directory, or a Hub id ("user/name")
    downloaded with `huggingface_hub.snapshot_download` (adapter files only)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not is_peft_dir(path):
            raise UserError(f"{path} is not a peft adapter directory (no {CONFIG})")
        return path
    if path.exists() or not _looks_like_hub_id(str(source)):
        raise UserError(f"adapter {source} does not exist (neither an adapter file nor a peft "
                        "adapter directory or Hub id)")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(str(source), allow_patterns=[CONFIG, WEIGHTS, WEIGHTS_BIN])
    except Exception as e:  # offline, unknown repo, gated: each a different hub error type
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"adapter {source}: not a local path, and the Hugging Face Hub "
                        f"did not give it ({reason})") from None
    if not is_peft_dir(local):
        raise UserError(f"Hub repo {source} holds no {CONFIG}: not a peft adapter")
    return Path(local)


def read_peft(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A peft LoRA adapter (directory or Hub id) as `read_adapter` returns a lora-repro one:
    (tensors "h.{i}.{letter}.lora_A/B", metadata). Says once on stderr when q, k and v
    factors come from dW's SVD (see `peft_format`)."""
    path = resolve(source)
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / CONFIG}: unreadable JSON ({e})") from None
    try:
        if (path / WEIGHTS).is_file():
            tensors = load_file(str(path / WEIGHTS))
        elif (path / WEIGHTS_BIN).is_file():
            tensors = torch.load(path / WEIGHTS_BIN, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"peft adapter {path} has no {WEIGHTS} or {WEIGHTS_BIN}")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"peft adapter {path}: unreadable weights ({type(e).__name__})") from None
    origin = (read_origin(path) or {}).get("config") or {}
    hint = export_layout(origin["targets"], int(origin["rank"])) if "rank" in origin else None
    tensors, meta = from_peft(tensors, config, f"peft adapter {path}", hint)
    if meta["structure"] == "svd" and str(path) not in _noted:
        _noted.add(str(path))
        print(f"note: {path}: {SVD_NOTE}", file=sys.stderr)
    return tensors, meta


def read_origin(path: str | os.PathLike) -> dict | None:
    """The source run's {"config", "base_fingerprint"} an export wrote, else None."""
    origin = Path(path) / ORIGIN
    return json.loads(origin.read_text()) if origin.is_file() else None


def write_peft(out_dir: str | os.PathLike, factors, meta: dict[str, str], base: str,
               origin: dict | None = None, copy: Sequence[Path] = ()) -> Path:
    """Write a lora-repro adapter (factors and metadata as `read_adapter` gives them) as a
    peft adapter directory naming `base` as its base model, with `origin` as lora_repro.json
    and the directories `copy` inside (a run's task-trained tokenizer). Written to a
    temporary directory and renamed, so `out_dir` is either complete or absent."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty; give a new directory")
    tensors, modules = to_peft(factors, meta["targets"], int(meta["rank"]), float(meta["alpha"]))
    config = peft_config(modules, float(meta["dropout"]), base)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if origin is not None:
        (tmp / ORIGIN).write_text(json.dumps(origin, indent=2, sort_keys=True) + "\n")
    for directory in copy:
        shutil.copytree(directory, tmp / Path(directory).name)
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)
    return out_dir
