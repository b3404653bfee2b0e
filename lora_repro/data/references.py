"""E2E text as the LoRA paper's code prepared it: `task.references=paper | original`.

The official repository's E2E files (microsoft/LoRA ``examples/NLG/data/e2e/*.txt``, from the
prefix-tuning code) hold tokenized text, MR values included (``£20-25`` -> ``£ 20 - 25``); the
paper trained on them and scored (``gpt2_decode.py`` + ``measure_scores.py``) against the
tokenized test references. The files come from two tokenizers, found by comparing each with
the official CSVs line by line:

- ``test.txt``: spaCy's rule tokenizer with spaCy 2's infix rules (a hyphen splits only between
  letters, so ``5-star`` stays; ``is n't``, ``£ 20``). 4,693 / 4,693 test references and MRs
  equal after collapsing whitespace; 4,680 byte for byte: the other 13 hold a run of ~300
  spaces before each ``;`` in the official file, an artifact we do not copy (every metric
  splits on whitespace, so scores are the same).
- ``train.txt`` / ``valid.txt`` (Wiseman et al. 2018's preprocessed data): Moses
  (``sacremoses``, aggressive dash splits, no escaping: ``isn 't``, ``5 - star``) plus a
  word-final ``.`` before a space split off (the files were sentence-split first).
  4,671 / 4,672 validation references equal (whitespace collapsed); 4,672 / 4,672 MRs.

So `paper` tokenizes the train and valid splits like train.txt and the test split like test.txt,
targets and MR values alike; `original` keeps the official CSV text. WebNLG and DART: the
official json files equal the original data (their lowercased, tokenized scoring is part of
the metrics, not of the data), so only `paper` is allowed there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from lora_repro.errors import UserError

REFERENCES = ("paper", "original")
TOKENIZED_TASKS = ("e2e",)  # tasks whose official files differ from the original data
_FINAL_PERIOD = re.compile(r"(?<=\w)\.(?= )")


def check_references(value: str, task: str) -> str:
    """Validate ``task.references`` for `task`; returns it.

    Raises:
        UserError: a value other than `REFERENCES`, or ``original`` for a task whose official
            files are already the original text.
    """
    if value not in REFERENCES:
        raise UserError(f"task.references={value!r}: allowed values are {REFERENCES}")
    if value != "paper" and task not in TOKENIZED_TASKS:
        raise UserError(f"task.references={value}: only e2e's official files are tokenized; "
                        f"task {task} allows only paper (its official data is the original)")
    return value


@lru_cache(maxsize=1)
def _spacy_tokenizer():
    import spacy  # slow to import (seconds): only `paper` E2E test text needs it
    from spacy.lang.punctuation import TOKENIZER_INFIXES
    from spacy.util import compile_infix_regex

    nlp = spacy.blank("en")
    # spaCy >= 2.1 English also splits a hyphen after a digit (5-star); test.txt does not, as
    # spaCy 2.0's rules, which are still the language-independent TOKENIZER_INFIXES.
    nlp.tokenizer.infix_finditer = compile_infix_regex(TOKENIZER_INFIXES).finditer
    return nlp.tokenizer


@lru_cache(maxsize=1)
def _moses_tokenizer():
    from sacremoses import MosesTokenizer

    return MosesTokenizer(lang="en")


def tokenize_test(text: str) -> str:
    """Text tokenized as the official E2E test.txt: spaCy (2.0 infix rules), spaces collapsed.

    >>> tokenize_test("It isn't family-friendly, £20-25.")
    "It is n't family - friendly , £ 20 - 25 ."
    """
    return " ".join(t.text for t in _spacy_tokenizer()(text) if not t.is_space)


def tokenize_train(text: str) -> str:
    """Text tokenized as the official E2E train.txt / valid.txt: Moses with aggressive dash
    splits and no escaping, then a word-final ``.`` before a space split off.

    >>> tokenize_train("It isn't family-friendly. near £20-25.")
    "It isn 't family - friendly . near £ 20 - 25 ."
    """
    moses = _moses_tokenizer().tokenize(text, escape=False, aggressive_dash_splits=True,
                                        return_str=True)
    return _FINAL_PERIOD.sub(" .", moses.replace(" @-@ ", " - "))


def saved_references(task: dict) -> str:
    """``references`` of a saved run's task config; runs made before the option have none and
    trained on the original text (the only text of tasks outside `TOKENIZED_TASKS`)."""
    if "references" in task:
        return task["references"]
    return "original" if task.get("name", "e2e") in TOKENIZED_TASKS else "paper"


def text_transform(references: str, split: str) -> Callable[[str], str] | None:
    """The function that prepares E2E text of `split` (train | valid | test) for
    `references`; None for ``original`` (the text is kept as it is)."""
    if references == "original":
        return None
    return tokenize_test if split == "test" else tokenize_train
