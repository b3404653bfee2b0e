"""DART (Nan et al. 2021): read the official json list and linearize its triple sets.

As in the LoRA code's DART converter, the source is the ``tripleset`` written
``subject : relation : object`` joined with `` | ``, with the relation lower-cased, and
every annotation's ``text`` is a reference.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_repro.data.records import Example
from lora_repro.data.webnlg import linearize_triples
from lora_repro.errors import UserError

# The official v1.1.1 split files, as named in the LoRA repository's data/dart/.
OFFICIAL_FILES = {
    "train": "dart-v1.1.1-full-train.json",
    "valid": "dart-v1.1.1-full-dev.json",
    "test": "dart-v1.1.1-full-test.json",
}


def dart_source(tripleset: list[list[str]]) -> str:
    """DART triple set -> linearized source, relations lower-cased.

    >>> dart_source([["Mars Hill College", "JOINED", "1973"]])
    'Mars Hill College : joined : 1973'
    """
    return linearize_triples([(s, p.lower(), o) for s, p, o in tripleset])


def read_dart_json(path: Path) -> list[Example]:
    """Read a DART json file (a list of ``tripleset``/``annotations`` items) into examples.

    Raises:
        UserError: when the file is not a list of DART items.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise UserError(f"{path}: a DART json is a list of items with 'tripleset'")
    examples = []
    for i, item in enumerate(data):
        try:
            source = dart_source(item["tripleset"])
            examples.extend(Example(source, a["text"].strip()) for a in item["annotations"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"{path}: item {i} is not a DART item ({err!r})") from None
    return examples
