"""Load E2E, WebNLG 2017 and DART from the Hugging Face hub (used when `data_dir` is None).

All three hub repositories are script-based, and `datasets` >= 4 no longer runs dataset
scripts, so we read the parquet export that the hub keeps on each repository's
``refs/convert/parquet`` branch (its config is named ``default`` for single-config repos).
Rows are converted to the same linearized `Example`s as the local readers produce, E2E text
prepared for ``task.references`` likewise (`lora_repro.data.references`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lora_repro.data import dart, e2e, references, webnlg
from lora_repro.data.records import Example
from lora_repro.errors import UserError


@dataclass(frozen=True)
class HubSource:
    """Where a task lives on the hub: repository, config, revision, our split -> hub split."""

    repo: str
    config: str
    splits: dict[str, str]
    revision: str = "refs/convert/parquet"


# Current dataset ids (checked 2025): the canonical `e2e_nlg`, `web_nlg` and `dart` were moved
# under their authors' namespaces. Columns: E2E `meaning_representation`, `human_reference`;
# WebNLG `category`, `modified_triple_sets.mtriple_set` ("s | p | o"), `lex.{text,comment}`;
# DART `tripleset`, `annotations.text`.
HUB_DATASETS = {
    "e2e": HubSource(
        "tuetschek/e2e_nlg", "default",
        {"train": "train", "valid": "validation", "test": "test"},
    ),
    "webnlg": HubSource(
        "webnlg-challenge/web_nlg", "webnlg_challenge_2017",
        {"train": "train", "valid": "dev", "test": "test"},
    ),
    "dart": HubSource(
        "Yale-LILY/dart", "default",
        {"train": "train", "valid": "validation", "test": "test"},
    ),
}


def _columns(value: dict | list) -> dict[str, list]:
    """A sequence-of-structs feature as a dict of lists (parquet may give either form)."""
    if isinstance(value, dict):
        return value
    return {key: [item[key] for item in value] for key in (value[0] if value else {})}


def e2e_row(row: dict, prepare: Callable[[str], str] | None = None) -> list[Example]:
    """One hub E2E row (one reference) -> one `Example`, none if the reference is blank;
    `prepare` applies to MR values and the reference (see `e2e.e2e_example`)."""
    ref = (row["human_reference"] or "").strip()
    return [e2e.e2e_example(row["meaning_representation"], ref, prepare)] if ref else []


def webnlg_row(row: dict) -> list[Example]:
    """One hub WebNLG entry -> one `Example` per ``good`` lexicalisation."""
    triple_set = _columns(row["modified_triple_sets"])["mtriple_set"][0]
    source = webnlg.linearize_triples([tuple(t.split(" | ")) for t in triple_set])
    lex = _columns(row["lex"])
    return [
        Example(source, text.strip(), row["category"])
        for text, comment in zip(lex["text"], lex["comment"], strict=True)
        if comment == "good"
    ]


def dart_row(row: dict) -> list[Example]:
    """One hub DART item -> one `Example` per annotation."""
    source = dart.dart_source(row["tripleset"])
    return [Example(source, text.strip()) for text in _columns(row["annotations"])["text"]]


OFFICIAL_FILES = {
    "e2e": e2e.OFFICIAL_FILES, "webnlg": webnlg.OFFICIAL_FILES, "dart": dart.OFFICIAL_FILES,
}

ROW_READERS: dict[str, Callable[[dict], list[Example]]] = {
    "e2e": e2e_row, "webnlg": webnlg_row, "dart": dart_row,
}


def load_hub_split(task: str, split: str, refs: str = "paper") -> list[Example]:
    """Download (or read from the `datasets` cache) one split of `task` as examples.

    Args:
        task: ``"e2e"``, ``"webnlg"`` or ``"dart"``.
        split: ``"train"``, ``"valid"`` or ``"test"``.
        refs: ``task.references`` (``paper`` | ``original``); only E2E text changes.

    Raises:
        UserError: when the hub cannot be reached (offline) or the dataset cannot be read;
            the message says how to point at local files instead.
    """
    import datasets  # slow to import; only hub loading needs it

    src = HUB_DATASETS[task]
    try:
        rows = datasets.load_dataset(
            src.repo, src.config, split=src.splits[split], revision=src.revision
        )
    except Exception as err:  # any failure here (offline, moved repo) has the same remedy
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        files = ", ".join(OFFICIAL_FILES[task].values())
        raise UserError(
            f"cannot load task {task} from the Hugging Face hub ({src.repo}: {reason}); "
            f"to use local files set task.data_dir=<folder holding {files}>"
        ) from err
    if task == "e2e":
        prepare = references.text_transform(refs, split)
        return [ex for row in rows for ex in e2e_row(row, prepare)]
    return [ex for row in rows for ex in ROW_READERS[task](row)]
