"""Length-grouped batches with dynamic padding, and the collate function.

Padding every sequence to a fixed 512 wastes most of the compute on E2E (~60 GPT-2 tokens
per example). Instead batches group examples of similar length and are padded to their own
longest member, the scheme of Hugging Face's ``group_by_length`` sampler, written here as a
pure function of ``(lengths, seed, epoch)`` so that a resumed run can rebuild the epoch's
batch list and skip the first k batches.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from lora_repro.data.encoding import IGNORE_INDEX
from lora_repro.errors import UserError


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of one epoch's order: depends on ``(seed, epoch)`` only."""
    return np.random.default_rng([seed, epoch])


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int,
    drop_last: bool = False, megabatch_mult: int = 50, longest_first: bool = False,
) -> list[list[int]]:
    """Batches of example indices, grouped by length; a pure function of its arguments.

    Indices are shuffled with a generator seeded by ``(seed, epoch)``, cut into megabatches
    of ``megabatch_mult * batch_size``, each megabatch is sorted by length (longest first,
    ties kept in shuffled order) and split into batches, and the batch order is shuffled.

    Args:
        lengths: token count of each example.
        batch_size: examples per batch; one batch (anywhere in the order) may be smaller.
        seed, epoch: the order is identical for equal ``(seed, epoch)``.
        drop_last: drop the one batch smaller than `batch_size`, if any.
        megabatch_mult: megabatch size in batches; larger groups tighter but less randomly.
        longest_first: move the batch with the longest example to the front, so that an
            out-of-memory error shows at the first step.

    Returns:
        A list of batches, each a list of indices into `lengths`; without `drop_last` every
        index appears exactly once.
    """
    if batch_size < 1 or megabatch_mult < 1:
        raise UserError(f"batch_size={batch_size}, megabatch_mult={megabatch_mult}: must be >= 1")
    rng = epoch_rng(seed, epoch)
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    order = rng.permutation(len(lengths_arr))
    mega = megabatch_mult * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        group = order[start:start + mega]
        group = group[np.argsort(-lengths_arr[group], kind="stable")]
        batches.extend(group[i:i + batch_size].tolist() for i in range(0, len(group), batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if longest_first and batches:
        top = max(range(len(batches)), key=lambda b: lengths_arr[batches[b]].max())
        batches.insert(0, batches.pop(top))
    return batches


def bucket_length(n: int, buckets: list[int]) -> int:
    """The smallest bucket >= n, so that padded shapes repeat (e.g. to reuse CUDA graphs).

    >>> bucket_length(70, [64, 128, 256])
    128

    Raises:
        UserError: when `n` exceeds the largest bucket.
    """
    ordered = sorted(buckets)
    i = bisect.bisect_left(ordered, n)
    if i == len(ordered):
        raise UserError(f"sequence length {n} exceeds the largest length bucket {ordered[-1:]}; "
                        "add a bucket >= max_length")
    return ordered[i]


def collate(
    features: list[dict], pad_id: int, pad_to: int | None = None, multiple_of: int = 1,
) -> dict[str, torch.Tensor]:
    """Right-pad a batch of encoded examples into tensors.

    Args:
        features: dicts with ``input_ids`` (list[int]) and optionally ``labels`` (list[int];
            defaults to ``input_ids``, i.e. loss on every token).
        pad_id: id written into padded ``input_ids`` positions (GPT-2 has no pad token;
            any id works since padded positions are masked out of attention and loss).
        pad_to: pad to exactly this length (e.g. from `bucket_length`); must be >= the
            longest sequence. Default: the longest sequence in the batch.
        multiple_of: round the padded length up to a multiple of this.

    Returns:
        ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long (1 on real tokens),
        ``labels`` (B, T) long with `IGNORE_INDEX` on padding.
    """
    longest = max(len(f["input_ids"]) for f in features)
    if pad_to is not None and pad_to < longest:
        raise UserError(f"pad_to={pad_to} is shorter than the longest sequence ({longest})")
    T = pad_to if pad_to is not None else longest
    T = -(-T // multiple_of) * multiple_of
    input_ids = torch.full((len(features), T), pad_id, dtype=torch.long)
    labels = torch.full((len(features), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), T), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(f.get("labels", f["input_ids"]), dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
