"""WebNLG 2017 challenge: read the challenge json (``entries``) and linearize triples.

As in the LoRA code's WebNLG converter, the source is the entry's *modified* triple set
written ``subject : property : object`` and joined with `` | `` (DBpedia underscores kept),
and only lexicalisations whose ``comment`` is ``"good"`` become references.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_repro.data.records import Example
from lora_repro.errors import UserError

# The official split files, as named in the LoRA repository's data/webnlg_challenge_2017/.
OFFICIAL_FILES = {"train": "train.json", "valid": "dev.json", "test": "test.json"}

def linearize_triples(triples: list[tuple[str, str, str]]) -> str:
    """Write triples as ``s : p : o | s : p : o`` (the LoRA code's WebNLG/DART format).

    >>> linearize_triples([("Aarhus", "leaderName", "Jacob_Bundsgaard")])
    'Aarhus : leaderName : Jacob_Bundsgaard'
    """
    return " | ".join(f"{s} : {p} : {o}" for s, p, o in triples)


def entry_examples(entry: dict) -> list[Example]:
    """One WebNLG entry -> one `Example` per ``good`` lexicalisation."""
    triples = [(t["subject"], t["property"], t["object"]) for t in entry["modifiedtripleset"]]
    source = linearize_triples(triples)
    return [
        Example(source, lex["lex"].strip(), entry["category"])
        for lex in entry["lexicalisations"]
        if lex.get("comment", "good") == "good"
    ]


def read_webnlg_json(path: Path) -> list[Example]:
    """Read a WebNLG 2017 challenge json file into examples, in entry order.

    Raises:
        UserError: when the file has no ``entries`` list or an entry lacks the expected keys.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise UserError(f"{path}: a WebNLG 2017 json needs a top-level 'entries' list")
    examples = []
    for i, item in enumerate(data["entries"]):
        try:
            (entry,) = item.values()  # each item is {"<1-based id>": entry}
            examples.extend(entry_examples(entry))
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path}: entry {i} is not a WebNLG entry ({err!r})") from None
    return examples
