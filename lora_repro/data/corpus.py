"""A plain-text corpus for causal language modelling, tokenized once and cached.

Input files are ``.txt``, ``.txt.gz`` or ``.txt.xz`` (UTF-8); documents are separated by a
line holding only ``<|endoftext|>``. Each document is tokenized (batched, so a fast
tokenizer uses all cores) and followed by the eos id; the token stream and the document
offsets are cached as ``.npy`` files keyed by the input files (path, size, mtime) and the
tokenizer. Validation documents are held out whole (no document straddles the split), then
each side is packed into rows of `block_size` tokens, GPT-2 style: documents joined by eos,
the remainder shorter than one block dropped.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import zlib
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lora_repro.errors import UserError

SUFFIXES = (".txt", ".txt.gz", ".txt.xz")
DOC_SEPARATOR = re.compile(r"^<\|endoftext\|>\r?$", flags=re.MULTILINE)
CACHE_VERSION = 1
_CHUNK_CHARS = 4_000_000  # text per tokenizer call: big enough to keep every core busy


def expand_paths(paths: str | list[str]) -> list[Path]:
    """Files named by `paths` (each a path or a glob pattern), checked to exist and be text.

    Raises:
        UserError: a pattern that matches nothing, a missing file or an unsupported suffix.
    """
    out: list[Path] = []
    for pattern in [paths] if isinstance(paths, str | os.PathLike) else paths:
        pattern = os.path.expanduser(str(pattern))
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(Path(m).is_file() for m in matches):
            raise UserError(f"task.paths: {pattern} matches no file")
        for m in matches:
            if not m.endswith(SUFFIXES):
                raise UserError(f"task.paths: {m} is not one of {', '.join(SUFFIXES)}")
            out.append(Path(m))
    if not out:
        raise UserError("task.paths: no corpus files given")
    return out


def read_text(path: Path) -> str:
    """The decompressed UTF-8 text of one corpus file.

    Raises:
        UserError: the file is unreadable, not UTF-8, or corrupt or truncated ``.gz``/``.xz``
            (a bad download should not end a run in a decompressor's traceback).
    """
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError, zlib.error) as e:
        # OSError covers gzip.BadGzipFile; EOFError is a truncated .gz or .xz.
        reason = (str(e).splitlines() or [""])[0]
        raise UserError(f"task.paths: cannot read {path} ({type(e).__name__}: {reason})") from e


def split_documents(text: str) -> list[str]:
    """Documents of a text: the parts between ``<|endoftext|>`` lines, empty ones dropped.

    >>> split_documents("a\\n<|endoftext|>\\nb\\n")
    ['a', 'b']
    """
    return [d.strip("\r\n") for d in DOC_SEPARATOR.split(text) if d.strip()]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the tokenizer's ids.

    Class, size and a probe's ids are not enough: two BPE tokenizers with the same vocabulary
    but different merges split words differently. So a fast tokenizer's whole definition
    (normalizer, pre-tokenizer, vocab, merges, added tokens) is hashed, less its per-call
    padding and truncation state; a slow one (ByT5) has no such definition, and its vocab,
    BPE merge ranks and sentencepiece model (where it has them) stand in. The special-token
    ids and a probe's ids cover what transformers does outside the definition.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("padding", None)
        definition.pop("truncation", None)
    else:
        ranks = getattr(tokenizer, "bpe_ranks", {})
        sp_model = getattr(tokenizer, "sp_model", None)
        definition = [sorted(tokenizer.get_vocab().items()), sorted(ranks, key=ranks.get),
                      sp_model.serialized_model_proto().hex() if sp_model else None]
    probe = "Hello, world! 12345 naïve café\n\tindent  <|endoftext|> ü€😀"
    special = [getattr(tokenizer, f"{t}_token_id") for t in ("bos", "eos", "pad", "unk")]
    blob = json.dumps([type(tokenizer).__name__, len(tokenizer), special, definition,
                       tokenizer(probe, add_special_tokens=False)["input_ids"]])
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(files: list[Path], tokenizer) -> str:
    """Hash of the files' resolved paths, sizes and mtimes and of the tokenizer."""
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    blob = json.dumps([CACHE_VERSION, stats, tokenizer_fingerprint(tokenizer)])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2: 50,257), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _chunks(docs: list[str]) -> list[list[str]]:
    """Consecutive groups of documents of about `_CHUNK_CHARS` characters each."""
    chunks, current, size = [], [], 0
    for doc in docs:
        current.append(doc)
        size += len(doc)
        if size >= _CHUNK_CHARS:
            chunks.append(current)
            current, size = [], 0
    return chunks + ([current] if current else [])


def tokenize_documents(docs: list[str], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents, each followed by eos.

    Returns:
        tokens: (N,) uint16/uint32, all documents with their eos, concatenated.
        offsets: (n_docs + 1,) int64; document i is ``tokens[offsets[i]:offsets[i + 1]]``.
    """
    dtype, eos = token_dtype(len(tokenizer)), tokenizer.eos_token_id
    parts, lengths = [], []
    total = sum(len(d) for d in docs)
    with tqdm(total=total, unit="char", unit_scale=True, desc="tokenizing corpus",
              disable=total < 10 * _CHUNK_CHARS) as bar:
        for chunk in _chunks(docs):
            ids = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            for doc_ids in ids:
                parts.append(np.asarray([*doc_ids, eos], dtype=dtype))
                lengths.append(len(doc_ids) + 1)
            bar.update(sum(len(d) for d in chunk))
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return tokens, offsets


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Write an ``.npy`` under a temporary name, then rename it into place."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def tokenized_corpus(
    files: list[Path], tokenizer, cache_dir: str | Path | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, offsets)`` of the files' documents, from the cache when it is there.

    The offsets file is written last, so its presence marks a complete cache entry.
    """
    stem = None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        stem = Path(cache_dir) / f"corpus-{cache_key(files, tokenizer)}"
        tok_path, off_path = Path(f"{stem}.tokens.npy"), Path(f"{stem}.offsets.npy")
        if tok_path.is_file() and off_path.is_file():
            return np.load(tok_path, mmap_mode="r"), np.load(off_path)
    docs = [doc for f in files for doc in split_documents(read_text(f))]
    tokens, offsets = tokenize_documents(docs, tokenizer)
    if stem is not None:
        _save_atomic(tok_path, tokens)
        _save_atomic(off_path, offsets)
    return tokens, offsets


def valid_document_mask(n_docs: int, valid_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask (n_docs,) of validation documents: a seeded random choice.

    ``round(valid_fraction * n_docs)`` documents (at least 1 when the fraction is > 0, and
    at most n_docs - 1) are drawn with ``numpy.random.default_rng(seed)``.
    """
    is_valid = np.zeros(n_docs, dtype=bool)
    if valid_fraction > 0 and n_docs >= 2:
        n_valid = min(max(1, round(valid_fraction * n_docs)), n_docs - 1)
        is_valid[np.random.default_rng(seed).choice(n_docs, n_valid, replace=False)] = True
    return is_valid


def pack_blocks(tokens: np.ndarray, offsets: np.ndarray, docs: np.ndarray,
                block_size: int) -> np.ndarray:
    """Join documents `docs` (in corpus order) and cut the stream into rows.

    Returns:
        (n_blocks, block_size) array of token ids; the tail shorter than a block is dropped.
    """
    pieces = [tokens[offsets[i]:offsets[i + 1]] for i in docs]
    stream = np.concatenate(pieces) if pieces else tokens[:0]
    n_blocks = len(stream) // block_size
    return np.ascontiguousarray(stream[: n_blocks * block_size]).reshape(n_blocks, block_size)


def load_corpus(
    paths: str | list[str], tokenizer, block_size: int, valid_fraction: float = 0.01,
    seed: int = 0, cache_dir: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize (or load from cache), split by document and pack a plain-text corpus.

    Args:
        paths: files or glob patterns (``.txt``, ``.txt.gz``, ``.txt.xz``).
        tokenizer: a Hugging Face tokenizer with an eos token (fast ones are much faster).
        block_size: tokens per row (the training context length).
        valid_fraction: share of documents held out for validation, in [0, 1).
        seed: seeds the choice of validation documents.
        cache_dir: where the tokenized corpus is cached; None disables caching.

    Returns:
        ``(train_blocks, valid_blocks)``, each (n_blocks, block_size), dtype uint16 for
        vocabularies up to 65,536 ids else uint32 (convert batches with
        ``torch.from_numpy(x.astype(np.int64))``). Rows are in corpus order; shuffle them.

    Raises:
        UserError: bad option, missing or unsupported file, or a split with no full block.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise UserError(f"task.block_size={block_size!r}: must be an integer >= 2")
    if (isinstance(valid_fraction, bool) or not isinstance(valid_fraction, int | float)
            or not 0 <= valid_fraction < 1):
        raise UserError(f"task.valid_fraction={valid_fraction!r}: must be a number in [0, 1)")
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {type(tokenizer).__name__} has no eos token to join documents")
    files = expand_paths(paths)
    tokens, offsets = tokenized_corpus(files, tokenizer, cache_dir)
    is_valid = valid_document_mask(len(offsets) - 1, valid_fraction, seed)
    train = pack_blocks(tokens, offsets, np.flatnonzero(~is_valid), block_size)
    valid = pack_blocks(tokens, offsets, np.flatnonzero(is_valid), block_size)
    if len(train) == 0 or (valid_fraction > 0 and len(valid) == 0):
        raise UserError(f"task.block_size={block_size}: the corpus ({len(tokens)} tokens) gives "
                        f"{len(train)} train and {len(valid)} valid blocks; need >= 1 each")
    return train, valid


class Blocks:
    """Packed blocks (n, block_size) read like encoded examples: row i is
    ``{"input_ids": ids, "labels": ids}`` (a language model's loss on every token)."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids = self.blocks[i].tolist()
        return {"input_ids": ids, "labels": ids}
