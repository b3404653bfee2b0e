"""Read one job directory back: config, tokenizer, base and trained models, A/B factors, dW.

The inverse of what `lora_repro.trainer.train` writes (layout and writing in
`lora_repro.rundir`; a sweep's jobs are found by `analysis.sweep_runs`); used by
`lora_repro.evaluate decode` and the `analysis` commands. A peft adapter directory reads
as a LoRA run too (`peft_summary` says how its config is made).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import GPT2LMHeadModel, PreTrainedTokenizerBase

from lora_repro import rundir
from lora_repro.config import TrainConfig, upgrade_saved
from lora_repro.errors import UserError
from lora_repro.lora import (
    adapter_factors,
    delta_weight,
    delta_weights,
    load_adapter,
    read_adapter,
)
from lora_repro.lora.peft_files import is_peft_dir, read_origin
from lora_repro.modeling import load_model, load_tokenizer

Key = tuple[int, str]


def is_complete(run_dir: Path) -> bool:
    return (Path(run_dir) / rundir.SUMMARY).is_file()


def run_config(run_dir: Path, overrides: list[str] | None = None) -> TrainConfig:
    """The run's config (from summary.json, else run_config.json), with `key=value`
    overrides such as `eval.beam=5` applied and type-checked. Keys the saved config predates
    take the value that run used (`upgrade_saved`: an old run's prompt format is "text")."""
    run_dir = Path(run_dir)
    if is_complete(run_dir):
        saved = upgrade_saved(rundir.read_json(run_dir / rundir.SUMMARY)["config"])
    elif (run_dir / rundir.CONFIG).is_file():
        saved = upgrade_saved(rundir.read_json(run_dir / rundir.CONFIG))
    elif is_peft_dir(run_dir):
        saved = upgrade_saved(peft_summary(run_dir)["config"])
    else:
        raise UserError(f"run={run_dir}: not a run directory (no {rundir.SUMMARY} or "
                        f"{rundir.CONFIG})")
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(saved))
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides or []))
    except Exception as e:  # omegaconf's errors name the key but span several lines
        raise UserError(f"bad override in {overrides}: {str(e).splitlines()[0]}") from None
    return OmegaConf.to_object(cfg)


def run_tokenizer(run_dir: Path, cfg: TrainConfig) -> PreTrainedTokenizerBase:
    """The tokenizer the run trained with (a task-trained BPE is saved in the run dir)."""
    if cfg.model.tokenizer == "bpe":
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(Path(run_dir) / rundir.TOKENIZER)
    return load_tokenizer(cfg.model.tokenizer)


def base_model(run_dir: Path, cfg: TrainConfig | None = None) -> GPT2LMHeadModel:
    """The run's frozen base W_0 (rebuilt from its seed for `model.init=random`), fp32, CPU."""
    cfg = cfg or run_config(run_dir)
    # only a random init sizes its vocabulary by the tokenizer (a peft base may have none)
    tokenizer = run_tokenizer(run_dir, cfg) if cfg.model.init == "random" else None
    return load_model(cfg.model, tokenizer).eval()


def trained_model(run_dir: Path, cfg: TrainConfig | None = None) -> GPT2LMHeadModel:
    """Base model plus the run's adapter (LoRA, dropout off), or the fully fine-tuned model."""
    run_dir = Path(run_dir)
    cfg = cfg or run_config(run_dir)
    if cfg.method == "full":
        path = run_dir / rundir.MODEL
        if not (path / "config.json").is_file():
            raise UserError(f"run={run_dir}: no fine-tuned model in {path} (is the run complete?)")
        return GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    return load_adapter(base_model(run_dir, cfg), adapter_path(run_dir), dropout=0.0)


def lora_factors_of(run_dir: Path) -> tuple[dict[Key, tuple[torch.Tensor, torch.Tensor]], dict]:
    """A (r x d_in) and B (d_out x r) per (layer, matrix) from the adapter file, and its
    metadata (rank, alpha, targets, ...). No model is loaded."""
    tensors, meta = read_adapter(adapter_path(run_dir))
    return adapter_factors(tensors, meta), meta


def delta_weights_of(run_dir: Path) -> dict[Key, torch.Tensor]:
    """dW (d_out x d_in) per (layer, matrix): (alpha/r) B A for LoRA runs, W_ft - W_0 for
    full fine-tuning (of the attention matrices q, k, v, o)."""
    cfg = run_config(run_dir)
    if cfg.method == "full":
        return delta_weights(trained_model(run_dir, cfg), base=base_model(run_dir, cfg))
    factors, meta = lora_factors_of(run_dir)
    scaling = float(meta["alpha"]) / int(meta["rank"])
    return {key: delta_weight(a, b, scaling) for key, (a, b) in factors.items()}


# ---------------------------------------------------------------- peft adapter directories


def adapter_path(run_dir: Path) -> Path:
    """The run's adapter file, or the directory itself for a peft adapter directory."""
    run_dir = Path(run_dir)
    path = run_dir / rundir.ADAPTER
    return run_dir if not path.is_file() and is_peft_dir(run_dir) else path


def peft_dirs(root: Path) -> list[Path]:
    """Every peft adapter directory below `root` (one holding adapter_config.json)."""
    return sorted(p.parent for p in Path(root).rglob("adapter_config.json"))


def seed_from_name(name: str) -> int | None:
    """The seed a directory name states at its end: "r8-qv-s2" -> 2, "lora_seed3" -> 3."""
    match = re.search(r"(?:^|[-_.])s(?:eed)?[-_=]?(\d+)$", name)
    return int(match[1]) if match else None


def peft_summary(path: Path) -> dict:
    """A summary.json-like {"config": ...} for a peft adapter directory, so the analysis
    pairs and labels it like a run.

    An export by lora-repro (with lora_repro.json) has its source run's config and base
    fingerprint; any other peft adapter a minimal config: method=lora, model.name =
    base_model_name_or_path (pretrained), task.name="peft". Both take targets, rank, alpha
    and dropout from the adapter, and the seed from the directory name where it ends in
    s<N> (e.g. "gpt2-lora-s2"), else the source run's seed, else 0. No metrics: the
    tables show its row without scores."""
    path = Path(path)
    tensors, meta = read_adapter(path)
    origin = read_origin(path) or {}
    config = dict(origin.get("config") or {
        "method": "lora", "task": {"name": "peft"},
        "model": {"id": Path(meta["base_model"]).name or "unknown", "name": meta["base_model"],
                  "tokenizer": meta["base_model"], "init": "pretrained"}})
    seed = seed_from_name(path.name)
    config |= {"targets": meta["targets"], "rank": int(meta["rank"]),
               "alpha": float(meta["alpha"]), "dropout": float(meta["dropout"]),
               "seed": seed if seed is not None else config.get("seed", 0)}
    summary = {"config": config, "metrics": {}, "source": "peft", "structure": meta["structure"],
               "trainable_params": sum(t.numel() for t in tensors.values())}
    if origin.get("base_fingerprint"):
        summary["base_fingerprint"] = origin["base_fingerprint"]
    return summary
