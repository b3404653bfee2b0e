"""Prompt formats and tokenization: prompt ids, then ``" " + target`` and eos; loss on the target.

The LoRA paper fine-tunes GPT-2 on the concatenation of the linearized source, a separator
and the reference, and trains only on the reference tokens (Hu et al. 2021, Section 5.4; the
official code's `FT_Dataset` masks the context out of the loss). `task.prompt_format`:

- ``official`` (default): the official data pipeline's ids (microsoft/LoRA
  `examples/NLG/src/gpt2_encode.py --add_bos --add_eos`, as `create_datasets.sh` runs it for
  E2E, WebNLG and DART): ``encode(source) + [eos]``, then ``encode(" " + target) + [eos]``.
  The separator is the tokenizer's eos id (GPT-2's ``<|endoftext|>``, 50256).
- ``text``: ``encode(source + " ||")``, then ``encode(" " + target) + [eos]``: a readable text
  separator, what this toolkit used before; a run saved without the key used it
  (`lora_repro.config.upgrade_saved`). For GPT-2's byte-level BPE the two parts tokenize as
  the whole string would, because its pre-tokenizer never merges across the space that
  starts the target (``tests/test_data.py`` checks it on E2E, WebNLG and DART).

Prompt and target are tokenized separately and concatenated, so decoding feeds exactly the
prompt ids training saw.

Conventions: ``labels[i] == input_ids[i]`` on target positions and `IGNORE_INDEX` on prompt
positions; Hugging Face causal LMs shift labels by one inside `forward`. No special tokens
are added by the tokenizer (`add_special_tokens=False`; ByT5's would otherwise append eos
itself); the eos id closes every target (and, in the official format, every prompt).
"""

from __future__ import annotations

from lora_repro.data.records import Example
from lora_repro.errors import UserError

SEPARATOR = " ||"  # prompt_format=text
PROMPT_FORMATS = ("official", "text")
IGNORE_INDEX = -100  # labels value that `torch.nn.functional.cross_entropy` skips


def prompt_text(source: str, prompt_format: str = "official") -> str:
    """The prompt's text: the source (``official``, whose separator is the eos id that
    `prompt_ids` appends) or ``source + " ||"`` (``text``)."""
    if prompt_format not in PROMPT_FORMATS:
        raise UserError(f"task.prompt_format={prompt_format!r}: allowed values are "
                        f"{PROMPT_FORMATS}")
    return source if prompt_format == "official" else source + SEPARATOR


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


def prompt_ids(tokenizer, sources: list[str], prompt_format: str = "official") -> list[list[int]]:
    """Each source's prompt ids, uncut: ``encode(source) + [eos]`` (``official``) or
    ``encode(source + " ||")`` (``text``)."""
    texts = [prompt_text(s, prompt_format) for s in sources]
    sep = [tokenizer.eos_token_id] if prompt_format == "official" else []
    return [ids + sep for ids in _token_ids(tokenizer, texts)]


def encode_example(tokenizer, ex: Example, max_length: int,
                   prompt_format: str = "official") -> dict:
    """One example -> ``dict(input_ids=list[int], labels=list[int])`` (see module docstring)."""
    return encode_dataset(tokenizer, [ex], max_length, prompt_format)[0]


def encode_dataset(tokenizer, examples: list[Example], max_length: int,
                   prompt_format: str = "official") -> list[dict]:
    """Encode many examples with two batched tokenizer calls.

    Each distinct source is tokenized once (E2E has about 8 references per MR).

    Returns:
        One ``dict(input_ids, labels)`` per example, in order; lengths vary (<= max_length).
    """
    eos = _check(tokenizer, max_length)
    sources = list(dict.fromkeys(ex.source for ex in examples))
    prompts = dict(zip(sources, prompt_ids(tokenizer, sources, prompt_format), strict=True))
    target_ids = _token_ids(tokenizer, [target_text(ex.target) for ex in examples])
    return [
        join_and_truncate(prompts[ex.source], ids + [eos], max_length)
        for ex, ids in zip(examples, target_ids, strict=True)
    ]


def encode_prompts(tokenizer, sources: list[str], max_length: int,
                   prompt_format: str = "official") -> list[list[int]]:
    """Prompt ids for decoding, each cut on the left to at most `max_length - 1` tokens: the
    prompt training saw (`join_and_truncate`; the official decoder also keeps a query's last
    tokens)."""
    _check(tokenizer, max_length)
    ids = prompt_ids(tokenizer, sources, prompt_format)
    return [p[max(0, len(p) - (max_length - 1)):] for p in ids]
