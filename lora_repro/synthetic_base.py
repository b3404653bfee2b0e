"""A tiny GPT-2 that knows the synthetic domain's language: pretrained here once, then cached.

`model.init=synthetic` (the smoke preset) gives LoRA a base worth adapting. A random-init
base makes the offline demo end at BLEU 0 and shows nothing of what LoRA does; no pretrained
GPT-2 can be downloaded offline. So, as GPT-2 was pretrained on web text before the paper
adapts it to E2E, this base is pretrained (every weight, causal LM loss) on restaurant
descriptions from the synthetic generator (`lora_repro.data.synthetic.descriptions`): the
domain's words and templates, but no MR and so never the MR -> text mapping the task trains.
LoRA then has to learn that mapping; the base, decoded on the test MRs, shows where it starts.

The byte-level BPE is trained on the same text and saved with the model. Both live in a
Hugging Face directory ``<model.cache_dir>/synthetic-<key>/``, where the key hashes
everything that decides the weights: the model's shape, `init_seed`, `pretrain_steps`, the
recipe below, the pretraining text itself and the torch version. A cache entry is written
under a temporary name and renamed; one that fails to load or to match its recorded weight
hash is rebuilt, with one warning line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from lora_repro.config import ModelConfig
from lora_repro.data.synthetic import descriptions

CACHE_VERSION = 1
# The pretraining recipe (any change gives a new cache key): AdamW with linear warm-up and
# cosine decay, rows of BLOCK tokens packed from descriptions joined by eos, about one pass.
# Small batches and documents that repeat their venue (REPEATS) matter: the base must learn
# to copy names and values seen earlier in its context, which LoRA then points at the MR;
# with 3 repeats or batches of 16 that skill formed later than the 600 steps fit in a minute.
BATCH, BLOCK, LR, WARMUP, WEIGHT_DECAY, TEXT_SEED = 8, 64, 3e-3, 20, 0.01, 0
REPEATS = 8  # a document describes its venue 1..REPEATS times
TOKENS_PER_DOCUMENT = 100  # about, eos included, for the BPE below: sizes the text to one pass
INFO = "pretraining.json"  # the cache entry's record: key, weight hash, losses, seconds


def pretraining_text(steps: int) -> list[str]:
    """Descriptions for about one pass of `steps` steps of BATCH x BLOCK tokens."""
    n = math.ceil(steps * BATCH * BLOCK / TOKENS_PER_DOCUMENT)
    return descriptions(n, TEXT_SEED, REPEATS)


def cache_key(cfg: ModelConfig, texts: list[str]) -> str:
    """A hash of everything that decides the pretrained weights and tokenizer."""
    recipe = [CACHE_VERSION, BATCH, BLOCK, LR, WARMUP, WEIGHT_DECAY, REPEATS, torch.__version__]
    shape = [cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions,
             cfg.init_seed, cfg.pretrain_steps, cfg.attn_implementation]
    text = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    return hashlib.sha256(json.dumps([recipe, shape, text]).encode()).hexdigest()[:16]


def pack(ids: list[list[int]], eos: int, block: int) -> torch.Tensor:
    """Documents joined by eos (each followed by one), cut into rows.

    Returns:
        (n_rows, block) int64; the tail shorter than a row is dropped.
    """
    stream = torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)
    n = len(stream) // block
    return stream[: n * block].view(n, block)


def pretrain(model: GPT2LMHeadModel, rows: torch.Tensor, steps: int, seed: int) -> list[float]:
    """Train every weight of `model` for `steps` steps of BATCH rows (cycling through `rows`,
    shuffled by `seed`) with next-token cross-entropy. Returns the loss of each step."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(rows), generator=gen)
                       for _ in range(math.ceil(steps * BATCH / len(rows)))])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    cosine = lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    model.train()
    losses = []
    for step in range(steps):
        batch = rows[order[step * BATCH:(step + 1) * BATCH]]  # (BATCH, BLOCK)
        logits = model(input_ids=batch).logits[:, :-1]  # (BATCH, BLOCK - 1, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def weights_hash(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def build(cfg: ModelConfig, texts: list[str], out: Path) -> dict:
    """Train the tokenizer and pretrain the model on `texts`; save both into `out`."""
    from lora_repro.modeling import load_model, train_bpe

    t0 = time.perf_counter()
    tokenizer = train_bpe(texts, cfg.vocab_size)
    model = load_model(replace(cfg, init="random"), tokenizer)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows = pack(ids, tokenizer.eos_token_id, BLOCK)
    with _threads(1):  # the same bits whatever `threads` the run uses
        losses = pretrain(model, rows, cfg.pretrain_steps, cfg.init_seed)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"tokens_per_row": BLOCK, "rows": len(rows), "steps": cfg.pretrain_steps,
            "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]),
            "seconds": round(time.perf_counter() - t0, 1), "weights_sha256": weights_hash(out)}


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _valid(path: Path, key: str) -> bool:
    """Whether `path` holds a complete entry for `key` whose weights match their hash."""
    try:
        info = json.loads((path / INFO).read_text())
        return info["key"] == key and info["weights_sha256"] == weights_hash(path)
    except (OSError, ValueError, KeyError):
        return False


def synthetic_base(cfg: ModelConfig) -> Path:
    """The directory of the pretrained base for `cfg` (`init=synthetic`), built if needed.

    Building costs 20-37 s on one CPU core for the default 600 steps, once per key.
    """
    texts = pretraining_text(cfg.pretrain_steps)
    key = cache_key(cfg, texts)
    root = Path(cfg.cache_dir).expanduser()
    path = root / f"synthetic-{key}"
    if _valid(path, key):
        return path
    if path.exists():
        print(f"warning: {path} is incomplete or corrupt; rebuilding it", file=sys.stderr)
    print(f"pretraining the synthetic base ({cfg.pretrain_steps} steps; cached in {path})",
          file=sys.stderr)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=root))
    try:
        info = {"key": key, **build(cfg, texts, tmp)}
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:  # a parallel job of the same sweep renamed its identical copy first
            if not _valid(path, key):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
