"""Plain-text corpus: reading, document split, caching and packing (lora_repro.data.corpus)."""

import gzip
import json
import lzma
import os

import numpy as np
import pytest
from tokenizers import Tokenizer
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from lora_repro.data import corpus
from lora_repro.data.corpus import load_corpus, split_documents
from lora_repro.errors import UserError
from lora_repro.modeling import train_bpe

SEP = "<|endoftext|>"


@pytest.fixture(scope="module")
def byt5():
    return ByT5Tokenizer()  # one id per byte (byte + 3), eos = 1: expectations are easy


def byte_ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]


def docs_of(n: int, start: int = 0) -> list[str]:
    return [f"document {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(start, start + n)]


def write(path, docs):
    text = "".join(f"{d}\n{SEP}\n" for d in docs)
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return path


def stream(docs):
    return [t for d in docs for t in [*byte_ids(d), 1]]


def test_split_documents_only_on_separator_lines():
    text = f"a\nb\n{SEP}\n\n{SEP}\nsay {SEP} inline\n{SEP}  \nc\r\n{SEP}\r\nd"
    assert split_documents(text) == ["a\nb", f"say {SEP} inline\n{SEP}  \nc", "d"]


def test_compressed_files_read_like_plain(tmp_path):
    docs = docs_of(3)
    texts = [corpus.read_text(write(tmp_path / f"x.txt{s}", docs)) for s in ("", ".gz", ".xz")]
    assert texts[0] == texts[1] == texts[2] and split_documents(texts[0]) == docs


def test_packing_joins_documents_with_eos_in_order(tmp_path, byt5):
    a, b = docs_of(4), docs_of(3, start=4)
    paths = [str(write(tmp_path / "a.txt.gz", a)), str(write(tmp_path / "b.txt.xz", b))]
    train, valid = load_corpus(paths, byt5, block_size=16, valid_fraction=0.0)
    expected = stream(a + b)
    assert train.dtype == np.uint16 and valid.shape == (0, 16)
    assert train.shape == (len(expected) // 16, 16)
    assert train.reshape(-1).tolist() == expected[: train.size]


def test_valid_split_is_by_document_and_deterministic(tmp_path, byt5):
    docs = docs_of(60)
    path = str(write(tmp_path / "c.txt", docs))
    train, valid = load_corpus(path, byt5, block_size=8, valid_fraction=0.2, seed=1)
    again = load_corpus(path, byt5, block_size=8, valid_fraction=0.2, seed=1)
    assert np.array_equal(train, again[0]) and np.array_equal(valid, again[1])
    other = load_corpus(path, byt5, block_size=8, valid_fraction=0.2, seed=2)[1]
    assert other.shape != valid.shape or not np.array_equal(other, valid)

    is_valid = corpus.valid_document_mask(len(docs), 0.2, seed=1)
    assert is_valid.sum() == 12
    held_out = [d for d, v in zip(docs, is_valid, strict=True) if v]
    kept = [d for d, v in zip(docs, is_valid, strict=True) if not v]
    assert valid.reshape(-1).tolist() == stream(held_out)[: valid.size]
    assert train.reshape(-1).tolist() == stream(kept)[: train.size]


def test_cache_is_reused_and_keyed_by_files_and_tokenizer(tmp_path, byt5, monkeypatch):
    path = write(tmp_path / "d.txt", docs_of(5))
    cache = tmp_path / "cache"
    first = load_corpus(str(path), byt5, 8, 0.0, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 2 and not list(cache.glob("*.tmp"))

    def no_tokenizing(*args):
        raise AssertionError("tokenized again despite a cache entry")

    monkeypatch.setattr(corpus, "tokenize_documents", no_tokenizing)
    assert np.array_equal(load_corpus(str(path), byt5, 8, 0.0, cache_dir=cache)[0], first[0])
    monkeypatch.undo()

    keys = {corpus.cache_key([path], byt5), corpus.cache_key([path], ByT5Tokenizer(extra_ids=0))}
    write(path, docs_of(6))
    os.utime(path, ns=(1, 1))
    keys.add(corpus.cache_key([path], byt5))
    assert len(keys) == 3
    changed = load_corpus(str(path), byt5, 8, 0.0, cache_dir=cache)[0]
    assert changed.reshape(-1).tolist() == stream(docs_of(6))[: changed.size]


def test_globs_and_errors(tmp_path, byt5):
    write(tmp_path / "e1.txt", docs_of(3))
    write(tmp_path / "e2.txt.xz", docs_of(3, start=3))
    assert [p.name for p in corpus.expand_paths(str(tmp_path / "e*"))] == ["e1.txt", "e2.txt.xz"]
    (tmp_path / "notes.md").write_text("x")
    cases = {
        str(tmp_path / "missing.txt"): "matches no file",
        str(tmp_path / "z*.txt"): "matches no file",
        str(tmp_path / "notes.md"): ".txt.xz",
    }
    for paths, expected in cases.items():
        with pytest.raises(UserError, match=expected):
            load_corpus(paths, byt5, 8)
    with pytest.raises(UserError, match="task.block_size=100000"):
        load_corpus(str(tmp_path / "e1.txt"), byt5, 100_000, 0.0)
    with pytest.raises(UserError, match="task.valid_fraction"):
        load_corpus(str(tmp_path / "e1.txt"), byt5, 8, 1.0)


def without_merge(tokenizer, token: str):
    """A copy of a fast BPE tokenizer without the merge that makes `token`: same vocabulary
    and size, but `token` is never produced."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = definition["model"]["merges"]
    [merge] = [m for m in merges if "".join(m) == token]
    merges.remove(merge)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(definition)),
                                   eos_token=tokenizer.eos_token)


def test_cache_is_keyed_by_bpe_merges(tmp_path):
    bpe = train_bpe(["the kernel of a kernel panics"] * 20 + ["hello world"], vocab_size=300)
    edited = without_merge(bpe, "Ġkernel")
    assert edited.get_vocab() == bpe.get_vocab() and edited.eos_token_id == bpe.eos_token_id
    ids, edited_ids = bpe(" kernel")["input_ids"], edited(" kernel")["input_ids"]
    assert len(ids) == 1 and len(edited_ids) > 1
    assert corpus.tokenizer_fingerprint(edited) != corpus.tokenizer_fingerprint(bpe)

    path, cache = write(tmp_path / "k.txt", ["a kernel"] * 8), tmp_path / "cache"
    first = load_corpus(str(path), bpe, 4, 0.0, cache_dir=cache)[0]
    second = load_corpus(str(path), edited, 4, 0.0, cache_dir=cache)[0]
    assert len(list(cache.glob("*.offsets.npy"))) == 2
    assert first.reshape(-1)[:3].tolist() == [*bpe("a kernel")["input_ids"], bpe.eos_token_id]
    assert second.reshape(-1)[:4].tolist() == [*edited("a kernel")["input_ids"], bpe.eos_token_id]


def test_fingerprint_ignores_padding_state_left_by_earlier_calls():
    bpe = train_bpe(["hello world"] * 5, vocab_size=270)
    before = corpus.tokenizer_fingerprint(bpe)
    bpe(["hello", "hello world"], padding=True, truncation=True, max_length=2)
    assert bpe.backend_tokenizer.padding is not None  # the state the fingerprint must ignore
    assert corpus.tokenizer_fingerprint(bpe) == before


def corrupt_xz(path):
    path.write_bytes(lzma.compress(b"some text\n")[:12] + b"\0garbage" * 4)


def truncated_gz(path):
    path.write_bytes(gzip.compress(("some text " * 200).encode())[:40])


@pytest.mark.parametrize("name, make, cause", [
    ("latin1.txt", lambda p: p.write_bytes("café\n".encode("latin-1")), "UnicodeDecodeError"),
    ("bad.txt.xz", corrupt_xz, "LZMAError"),
    ("cut.txt.gz", truncated_gz, "EOFError"),
], ids=["not-utf8", "corrupt-xz", "truncated-gz"])
def test_unreadable_file_is_one_line_user_error(tmp_path, byt5, name, make, cause):
    make(tmp_path / name)
    with pytest.raises(UserError) as err:
        load_corpus(str(tmp_path / name), byt5, 8, 0.0)
    message = str(err.value)
    assert message.startswith(f"task.paths: cannot read {tmp_path / name} ({cause}: ")
    assert "\n" not in message
