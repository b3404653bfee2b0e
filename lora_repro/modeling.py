"""Load the base GPT-2 and its tokenizer: from the hub, a local directory, or random init.

Offline with no local copy, loading fails with one `UserError` line that says how to point
at a local copy, instead of a wall of hub tracebacks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from lora_repro.config import ModelConfig
from lora_repro.errors import UserError


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _unreachable(key: str, name: str, what: str) -> UserError:
    if _looks_local(name):
        return UserError(f"{key}={name!r}: no {what} in that directory")
    return UserError(
        f"{key}={name!r}: cannot load it from the Hugging Face hub (offline, or not cached); "
        f"point {key} at a local directory with the {what}"
    )


def train_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on `texts` (deterministic; < 1 s for a
    few thousand examples). Gives offline tiny models GPT-2-like sequence lengths."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """A GPT-2 BPE tokenizer from a hub id or local directory, or "byt5" (bytes, no files).
    ("bpe", a tokenizer trained on the task's data, is built by `train_bpe` instead.)

    GPT-2 has no pad token; padding uses eos, which the loss and attention never see
    (labels are -100 there and padding is on the right)."""
    if name == "byt5":
        tokenizer = ByT5Tokenizer()
    else:
        # A directory saved by transformers names its class (a stand-in exported by
        # method=full may carry ByT5's); GPT-2's bare vocab.json + merges.txt do not.
        saved = _saved_tokenizer_class(name)
        cls = AutoTokenizer if saved and not saved.startswith("GPT2") else GPT2TokenizerFast
        try:
            tokenizer = cls.from_pretrained(name)
        except (OSError, ValueError) as e:
            what = "tokenizer files (vocab.json, merges.txt)"
            raise _unreachable("model.tokenizer", name, what) from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _saved_tokenizer_class(name: str) -> str | None:
    path = Path(name).expanduser() / "tokenizer_config.json"
    return json.loads(path.read_text()).get("tokenizer_class") if path.is_file() else None


def _no_dropout(config: GPT2Config, p: float) -> GPT2Config:
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = p
    return config


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> GPT2LMHeadModel:
    """The base model in float32 on the CPU (the caller moves it).

    `init=pretrained` loads `cfg.name`; `init=random` builds the shape in `cfg` with the
    tokenizer's vocabulary, seeded by `cfg.init_seed`, so a run can rebuild the same base;
    `init=synthetic` loads that random init pretrained on the synthetic domain's text
    (`lora_repro.synthetic_base`, built and cached on first use).
    """
    if cfg.init in ("pretrained", "synthetic"):
        name = cfg.name
        if cfg.init == "synthetic":
            from lora_repro.synthetic_base import synthetic_base

            name = str(synthetic_base(cfg))
        try:
            config = GPT2Config.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise _unreachable("model.name", name, "model files (config.json, weights)") from e
        try:
            return GPT2LMHeadModel.from_pretrained(
                name,
                config=_no_dropout(config, cfg.dropout),
                attn_implementation=cfg.attn_implementation,
                dtype=torch.float32,
            )
        except OSError as e:  # a directory (or hub id) with a config but no weights
            what = "weights (model.safetensors or pytorch_model.bin, beside config.json)"
            raise _unreachable("model.name", name, what) from e
    config = GPT2Config(
        n_layer=cfg.n_layer,
        n_embd=cfg.n_embd,
        n_head=cfg.n_head,
        n_positions=cfg.n_positions,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"model.n_embd={cfg.n_embd} must be divisible by model.n_head={cfg.n_head}")
    config._attn_implementation = cfg.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        return GPT2LMHeadModel(_no_dropout(config, cfg.dropout))


def base_fingerprint(model: GPT2LMHeadModel) -> str:
    """A short hash of a model's weights, to tell later whether the base a run was trained on
    is still what `model.name` loads (a re-pretrained stand-in has the same shape). Hashes the
    first 16 KiB of every parameter: cheap at any size, and any retraining changes them."""
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        digest.update(name.encode())
        digest.update(param.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA where available, else CPU; asking for CUDA without it is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name!r}: CUDA is not available here; use device=cpu")
    return torch.device(name)


def autocast(precision: str, device: torch.device):
    """A context factory: bf16 autocast for precision "bf16", or "auto" on CUDA; else fp32."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
