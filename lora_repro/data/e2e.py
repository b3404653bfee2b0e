"""E2E NLG Challenge: read the official CSV files and linearize meaning representations.

The official files (Novikova et al. 2017) have columns ``mr,ref``: one row per reference,
several consecutive rows per MR such as
``name[Alimentum], area[city centre], familyFriendly[no]``.

The LoRA code's E2E data (inherited from prefix-tuning) writes each MR as
``name : Alimentum | area : city centre | family friendly : no``: slot names renamed as in
`SLOT_NAMES`, slots joined with `` | ``. Values and references are kept verbatim
(``task.references=original``) or tokenized as the official files are
(``task.references=paper``, see `lora_repro.data.references`).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from pathlib import Path

from lora_repro.data.records import Example
from lora_repro.errors import UserError

# The official split files (testset.csv holds MRs only; the references are in *_w_refs).
OFFICIAL_FILES = {"train": "trainset.csv", "valid": "devset.csv", "test": "testset_w_refs.csv"}

# E2E slot name -> the name used in the linearized source (LoRA / prefix-tuning data).
SLOT_NAMES = {
    "name": "name",
    "eatType": "Type",
    "food": "food",
    "priceRange": "price",
    "customer rating": "customer rating",
    "area": "area",
    "familyFriendly": "family friendly",
    "near": "near",
}

_SLOT = r"\s*([^,\[\]]+?)\s*\[([^\]]*)\]\s*"  # one `slot[value]`, groups: slot, value
_SLOT_RE = re.compile(_SLOT)
_MR_RE = re.compile(rf"{_SLOT}(?:,{_SLOT})*")


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """Split an E2E MR into ``(slot, value)`` pairs, in order.

    >>> parse_mr("name[The Eagle], priceRange[£20-25]")
    [('name', 'The Eagle'), ('priceRange', '£20-25')]

    Raises:
        UserError: when the text is not a comma-separated list of ``slot[value]``.
    """
    if not _MR_RE.fullmatch(mr):
        raise UserError(f"E2E MR {mr!r} is not of the form 'slot[value], slot[value], ...'")
    return _SLOT_RE.findall(mr)


def linearize_slots(pairs: list[tuple[str, str]]) -> str:
    """Write ``(slot, value)`` pairs as ``slot : value | slot : value`` (LoRA's E2E format)."""
    return " | ".join(f"{SLOT_NAMES.get(k, k)} : {v}" for k, v in pairs)


def linearize_mr(mr: str) -> str:
    """E2E MR string -> the linearized source the model reads.

    >>> linearize_mr("name[Alimentum], eatType[coffee shop], familyFriendly[no]")
    'name : Alimentum | Type : coffee shop | family friendly : no'
    """
    return linearize_slots(parse_mr(mr))


def _check_columns(path: Path, fieldnames: list[str] | None) -> list[str]:
    columns = [c.strip().lower() for c in fieldnames or []]
    if "mr" not in columns or "ref" not in columns:
        raise UserError(
            f"{path}: an E2E CSV needs columns 'mr' and 'ref', found {columns} "
            "(the test file with references is testset_w_refs.csv)"
        )
    return columns


def check_header(path: Path, text: str) -> None:
    """A cheap look at an E2E CSV's text: the `mr,ref` header and at least one row below it."""
    lines = iter(text.splitlines())
    _check_columns(path, next(csv.reader(lines), None))
    if not any(line.strip() for line in lines):
        raise UserError(f"{path} holds only its header; give a file with at least one row")


def e2e_example(mr: str, ref: str, prepare: Callable[[str], str] | None = None) -> Example:
    """One MR and reference -> an `Example`; `prepare` (e.g. a tokenizer of
    `lora_repro.data.references`) is applied to every MR value and to the reference.

    >>> e2e_example("name[Loch Fyne], priceRange[£20-25]", "Loch Fyne: £20-25.").source
    'name : Loch Fyne | price : £20-25'
    """
    pairs = parse_mr(mr)
    if prepare is not None:
        pairs = [(slot, prepare(value)) for slot, value in pairs]
        ref = prepare(ref)
    return Example(linearize_slots(pairs), ref)


def read_e2e_csv(path: Path, prepare: Callable[[str], str] | None = None) -> list[Example]:
    """Read an official E2E CSV (``mr,ref`` columns) into one `Example` per row, in order,
    with `prepare` applied to MR values and references (see `e2e_example`).

    Raises:
        UserError: when the file lacks an ``mr`` or a ``ref`` column (e.g. ``testset.csv``,
            which has no references: use ``testset_w_refs.csv``).
    """
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = _check_columns(path, reader.fieldnames)
        mr_key, ref_key = (reader.fieldnames[columns.index(c)] for c in ("mr", "ref"))
        examples = []
        for row in reader:
            mr, ref = (row[mr_key] or ""), (row[ref_key] or "").strip()
            try:
                if not ref:
                    raise UserError(f"empty ref for MR {mr!r}")
                examples.append(e2e_example(mr, ref, prepare))
            except UserError as err:
                raise UserError(f"{path}, line {reader.line_num}: {err}") from None
        return examples
