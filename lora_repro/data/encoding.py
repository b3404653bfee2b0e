"""Prompt format and tokenization: ``source + " || " + target + eos``, loss on the target.

The LoRA paper fine-tunes GPT-2 on the concatenation of the linearized source, a
separator and the reference, and trains only on the reference tokens (Hu et al. 2021,
Section 5.4; the official code's `FT_Dataset` masks the context out of the loss). We
tokenize the prompt ``source + " ||"`` and the target ``" " + target`` separately and
concatenate the ids. For GPT-2's byte-level BPE this equals tokenizing the whole string,
because its pre-tokenizer never merges across the space that starts the target
(``tests/test_data.py`` checks it on E2E, WebNLG and DART); it also gives decoding the exact
prompt ids training saw.

(The official code separates source and target with an extra ``<|endoftext|>`` id instead of
``" ||"``; we keep the text separator so prompts are readable and tokenizer-agnostic.)

Conventions: ``labels[i] == input_ids[i]`` on target positions and `IGNORE_INDEX` on prompt
positions; Hugging Face causal LMs shift labels by one inside `forward`. No special tokens
are added (`add_special_tokens=False`; ByT5's tokenizer would otherwise append eos itself);
the eos id closes every target.
"""

from __future__ import annotations

from lora_repro.data.records import Example
from lora_repro.errors import UserError

SEPARATOR = " ||"
IGNORE_INDEX = -100  # labels value that `torch.nn.functional.cross_entropy` skips


def prompt_text(source: str) -> str:
    """What the model is fed at decoding time: ``source + " ||"``."""
    return source + SEPARATOR


def target_text(target: str) -> str:
    """The text the model learns to continue a prompt with: ``" " + target``."""
    return " " + target


def join_and_truncate(prompt: list[int], target: list[int], max_length: int) -> dict:
    """Concatenate prompt and target ids into ``input_ids`` and ``labels`` of length <= max_length.

    Truncation rule for over-long examples: the prompt is kept whole and the target is cut
    on the right (losing its eos), as the official code cuts the concatenation on the right.
    Only if the prompt alone leaves no room for one target token is the prompt cut on the
    left to ``max_length - 1`` tokens (keeping the separator next to the target, as the
    official decoder truncates queries), so every example trains at least one token.
    """
    if len(prompt) > max_length - 1:
        prompt = prompt[len(prompt) - (max_length - 1):]
    target = target[: max_length - len(prompt)]
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}


def _check(tokenizer, max_length: int) -> int:
    """The tokenizer's eos id, after checking `max_length` and that an eos exists."""
    if not isinstance(max_length, int) or max_length < 2:
        raise UserError(f"max_length={max_length!r}: must be an integer >= 2")
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {type(tokenizer).__name__} has no eos token; one is needed")
    return tokenizer.eos_token_id


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Batch-tokenize `texts` without special tokens."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, ex: Example, max_length: int) -> dict:
    """One example -> ``dict(input_ids=list[int], labels=list[int])`` (see module docstring)."""
    return encode_dataset(tokenizer, [ex], max_length)[0]


def encode_dataset(tokenizer, examples: list[Example], max_length: int) -> list[dict]:
    """Encode many examples with two batched tokenizer calls.

    Each distinct source is tokenized once (E2E has about 8 references per MR).

    Returns:
        One ``dict(input_ids, labels)`` per example, in order; lengths vary (<= max_length).
    """
    eos = _check(tokenizer, max_length)
    sources = list(dict.fromkeys(ex.source for ex in examples))
    prompt_ids = dict(zip(sources, _token_ids(tokenizer, [prompt_text(s) for s in sources]),
                          strict=True))
    target_ids = _token_ids(tokenizer, [target_text(ex.target) for ex in examples])
    return [
        join_and_truncate(prompt_ids[ex.source], ids + [eos], max_length)
        for ex, ids in zip(examples, target_ids, strict=True)
    ]


def encode_prompts(tokenizer, sources: list[str], max_length: int) -> list[list[int]]:
    """Prompt ids for decoding, each cut on the left to at most `max_length - 1` tokens: the
    prompt training saw (`join_and_truncate`)."""
    _check(tokenizer, max_length)
    ids = _token_ids(tokenizer, [prompt_text(s) for s in sources])
    return [p[max(0, len(p) - (max_length - 1)):] for p in ids]
