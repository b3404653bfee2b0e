"""The run directory: the contract between training and `analysis/`.

    runs/<name>/<job>/
        run_config.json         the job's full config, written once the directory is checked
        adapter.safetensors     final LoRA factors (`lora_repro.lora.save_adapter`)
        metrics.jsonl           one JSON object per logged step or epoch
        predictions.txt         decoded test outputs, one line per unique source
        base_predictions.txt    only for eval.base=true: the base model's, before training
        tokenizer/              only for model.tokenizer=bpe: the tokenizer trained on the task
        model/                  only for method=full: the fine-tuned model (Hugging Face format)
        summary.json            written last and atomically; a job without it is incomplete
        checkpoints/last.pt     resume state (weights, optimizer, scheduler, RNG, data position)

Every file a reader may take for finished is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lora_repro.config import TrainConfig
from lora_repro.errors import UserError

SUMMARY = "summary.json"
CONFIG = "run_config.json"
ADAPTER = "adapter.safetensors"
METRICS = "metrics.jsonl"
PREDICTIONS = "predictions.txt"
BASE_PREDICTIONS = "base_predictions.txt"  # eval.base=true: the untrained base's outputs
CHECKPOINT = "checkpoints/last.pt"
TOKENIZER = "tokenizer"  # only for model.tokenizer=bpe, trained on the task
MODEL = "model"  # method=full: the fine-tuned model as a Hugging Face directory
# Keys that do not change what a run computes: a rerun with other values resumes it.
NOT_IDENTITY = ("logger", "eval", "device", "compile", "threads", "name")
LORA_ONLY = ("targets", "rank", "alpha", "dropout")  # no part of a method=full run


def _not_identity(config: dict) -> tuple[str, ...]:
    return NOT_IDENTITY + (LORA_ONLY if config.get("method") == "full" else ())


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a crash leaves the old file or the new
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def identity(cfg: TrainConfig) -> dict:
    """The part of the config that determines a run's result."""
    d = asdict(cfg)
    for key in _not_identity(d):
        d.pop(key, None)
    return d


def flat_identity(config: dict) -> dict[str, Any]:
    """A saved config (summary.json "config") as dotted keys, without NOT_IDENTITY:
    {"model": {"id": "tiny"}, "rank": 8, "logger": ...} -> {"model.id": "tiny", "rank": 8}."""
    def flatten(d: dict, prefix: str) -> dict[str, Any]:
        out = {}
        for key, value in d.items():
            if isinstance(value, dict):
                out |= flatten(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
        return out

    return flatten({k: v for k, v in config.items() if k not in _not_identity(config)}, "")


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def check_same_run(run_dir: Path, saved: dict, cfg: TrainConfig) -> None:
    """Refuse to resume or skip a run directory that holds a run of other settings."""
    diff = _diff(saved, identity(cfg))
    if diff:
        raise UserError(
            f"{run_dir} holds a run with other settings ({'; '.join(diff[:3])}); "
            "pass name=<new name> or hydra.run.dir=<dir> to start a separate run"
        )


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or corrupt: torch raises one of several types
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to "
                        "start this run over") from None


def find_runs(root: Path) -> list[Path]:
    """Every job directory below `root` (a dir holding `run_config.json` or `summary.json`)."""
    return sorted({p.parent for name in (CONFIG, SUMMARY) for p in Path(root).rglob(name)})
