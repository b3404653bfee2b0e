"""The records every task yields: training pairs, test sources with grouped references.

A *source* is the linearized input (an E2E meaning representation, WebNLG/DART triples) and
a *target* is one human reference for it. Training sees one `Example` per (source, reference)
pair, as the LoRA paper's data-to-text setups do (Hu et al. 2021, Section 5.4 and Appendix
C); testing decodes each distinct source once and scores it against all its references.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One training pair: a linearized source and one reference text.

    `category` is the WebNLG DBpedia category (e.g. ``"Airport"``), empty for other tasks.
    """

    source: str
    target: str
    category: str = ""


@dataclass(frozen=True)
class TestSource:
    """One distinct test source and all of its references, in file order.

    `category` is the WebNLG DBpedia category of its first entry, else empty. `seen` is, per
    reference, whether its entry's category occurs in the training split (WebNLG's seen /
    unseen parts, Hu et al. 2021 Table 13); None where not known.
    """

    source: str
    references: tuple[str, ...]
    category: str = ""
    seen: tuple[bool, ...] | None = None


@dataclass
class TaskData:
    """A task's three splits.

    `train` and `valid` hold one `Example` per reference; `test` holds one `TestSource` per
    distinct source, in the order of first appearance in the test file.
    """

    name: str
    train: list[Example]
    valid: list[Example]
    test: list[TestSource]


def group_by_source(examples: list[Example],
                    seen_categories: Collection[str] | None = None) -> list[TestSource]:
    """Group references by identical source string, in order of first appearance.

    Mirrors the official LoRA decoding script, which keys references by the context string,
    so duplicate sources (DART holds some) pool their references into one test item. With
    ``seen_categories`` (the training split's), each reference is marked seen or not.

    >>> group_by_source([Example("a", "x"), Example("b", "y"), Example("a", "z")])[0].references
    ('x', 'z')
    """
    refs: dict[str, list[Example]] = {}
    for ex in examples:
        refs.setdefault(ex.source, []).append(ex)
    return [
        TestSource(src, tuple(ex.target for ex in group), group[0].category,
                   None if seen_categories is None
                   else tuple(ex.category in seen_categories for ex in group))
        for src, group in refs.items()
    ]


def seen_flags(test: list[TestSource]) -> list[tuple[bool, ...]] | None:
    """Per test source, its references' seen flags; None unless every source has them."""
    flags = [t.seen for t in test]
    return None if any(f is None for f in flags) else flags
