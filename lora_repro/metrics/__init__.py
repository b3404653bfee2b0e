"""The E2E NLG metrics of the LoRA paper's Table 3; WebNLG/DART's BLEU, METEOR, TER.

``score_e2e`` reproduces ``measure_scores.py -p`` of github.com/tuetschek/e2e-metrics:
BLEU and NIST as its ``pymteval.py`` (see ``mteval``), METEOR, ROUGE-L and CIDEr as its
MS-COCO evaluation fork (see ``coco``). ``read_refs_csv`` and ``read_hyps`` read files the
way that script does. All scores are on the official scale (BLEU, METEOR, ROUGE-L in 0..1).
``score_generation_eval`` (see ``generation_eval``) scores WebNLG and DART as the paper's
Tables 13-14 do; ``score_bleu_meteor`` is the earlier, approximate scorer.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import sacrebleu

from lora_repro.errors import UserError
from lora_repro.metrics import coco, mteval
from lora_repro.metrics.generation_eval import GENERATION_EVAL_METRICS, score_generation_eval

E2E_METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
# Header names measure_scores.py accepts for the MR and the reference column (re.match, any case).
_MR_HEADER = re.compile(
    r"(mr|src|source|meaning([_ .-]rep(resentation)?)?|da|dial(ogue)?[_ .-]act)s?", re.I)
_REF_HEADER = re.compile(r"(trg|tgt|target|ref(erence)?|human([_ .-]ref(erence)?)?)s?", re.I)
# measure_scores.read_tsv repairs these encoding errors of the crowd-sourced E2E files.
_MOJIBAKE = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))

__all__ = ["E2E_METRICS", "GENERATION_EVAL_METRICS", "check_metrics", "read_hyps",
           "read_refs_csv", "score_bleu_meteor", "score_e2e", "score_generation_eval"]


def _read_lines(path: str | Path, what: str) -> list[str]:
    """Stripped lines as measure_scores.read_lines: UTF-8, Unicode line breaks, no BOM strip."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} file {path} is a directory; give the file in it")
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{what} file {path} is not UTF-8 ({err.reason} at byte {err.start})") from None
    lines = [line.strip() for line in text.splitlines()]
    if not any(lines):
        raise UserError(f"{what} file {path} is empty")
    return lines


def read_hyps(path: str | Path, expected: int | None = None) -> list[str]:
    """One hypothesis per line, stripped; blank lines are kept as empty outputs.

    With `expected` (the number of sources), blank lines at the end beyond that many are
    dropped: they cannot be outputs. (measure_scores.py keeps them and fails its length
    assert; a file saved with an extra newline then scores as without it.)"""
    lines = _read_lines(path, "hypothesis")
    if expected is not None:
        while len(lines) > expected and not lines[-1]:
            lines.pop()
    return lines


def _column(header: list[str], pattern: re.Pattern, name: str, path: Path) -> int:
    matches = [i for i, field in enumerate(header) if pattern.match(field)]
    if len(matches) != 1:
        raise UserError(f"{path}: the header needs one `{name}` column (as in `mr,ref`), "
                        f"got {header}")
    return matches[0]


def read_refs_csv(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Read an E2E references CSV (columns ``mr,ref``), as ``measure_scores.read_and_group_tsv``.

    Consecutive rows with the same MR are the references of one instance. The header may be
    quoted or not and may use the other names measure_scores accepts (``src``, ``reference``,
    ...); a tab-separated file works too. Returns ``(mrs, refs)`` with one MR and one list of
    references per instance, in file order.
    """
    path = Path(path)
    lines = _read_lines(path, "references")
    lines[0] = lines[0].replace("\ufeff", "")
    for bad, good in _MOJIBAKE:
        lines = [line.replace(bad, good) for line in lines]
    lines = [line for line in lines if line]
    rows = list(csv.reader(lines, delimiter="\t" if "\t" in lines[0] else ","))
    header = rows[0]
    mr_col = _column(header, _MR_HEADER, "mr", path)
    ref_col = _column(header, _REF_HEADER, "ref", path)
    bad_rows = [i for i, row in enumerate(rows[1:], start=2) if len(row) != len(header)]
    if bad_rows:
        raise UserError(f"{path}: rows {bad_rows[:5]} do not have {len(header)} columns")
    if len(rows) < 2:
        raise UserError(f"{path} has a header but no references")
    mrs: list[str] = []
    refs: list[list[str]] = []
    for row in rows[1:]:
        if not mrs or row[mr_col] != mrs[-1]:
            mrs.append(row[mr_col])
            refs.append([])
        refs[-1].append(row[ref_col])
    return mrs, refs


def check_metrics(metrics: Sequence[str], allowed: Sequence[str] = E2E_METRICS) -> list[str]:
    """Canonical metric names (any case accepted); ``UserError`` for an unknown name."""
    by_lower = {m.lower(): m for m in allowed}
    names = [m.strip() for m in metrics if m.strip()]
    unknown = [m for m in names if m.lower() not in by_lower]
    if unknown:
        raise UserError(f"unknown metric {', '.join(map(repr, unknown))}; "
                        f"allowed: {', '.join(allowed)}")
    if not names:
        raise UserError(f"no metric given; allowed: {', '.join(allowed)}")
    return [by_lower[m.lower()] for m in names]


def _check_corpus(refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> None:
    if len(refs) != len(hyps):
        raise UserError(f"{len(hyps)} hypotheses but {len(refs)} reference groups; "
                        "give one hypothesis per MR")
    if not hyps:
        raise UserError("nothing to score: no hypotheses")
    if any(len(group) == 0 for group in refs):
        raise UserError("every hypothesis needs at least one reference")


def _coco_scores(refs, hyps, metrics: Sequence[str], extra, meteor: coco.Meteor | None):
    """METEOR / ROUGE_L / CIDEr of raw text; ``extra()`` runs while METEOR's JVM loads."""
    with ExitStack() as stack:
        if "METEOR" in metrics and meteor is None:
            meteor = stack.enter_context(coco.shared_meteor())  # loads while extra() runs
        scores = extra()
        if any(m in coco.JAVA_METRICS for m in metrics):
            tok_refs, tok_hyps = coco.tokenize_corpus(refs, hyps)
            if "ROUGE_L" in metrics:
                scores["ROUGE_L"] = coco.rouge_l(tok_refs, tok_hyps)
            if "CIDEr" in metrics:
                scores["CIDEr"] = coco.cider(tok_refs, tok_hyps)
            if "METEOR" in metrics:
                scores["METEOR"] = meteor.score(tok_refs, tok_hyps)
    return scores


def score_e2e(refs: Sequence[Sequence[str]], hyps: Sequence[str],
              metrics: Sequence[str] = E2E_METRICS,
              meteor: coco.Meteor | None = None) -> dict[str, float]:
    """E2E challenge scores of ``hyps`` (one per MR) against ``refs`` (a list per MR).

    Mirrors ``measure_scores.py -p``. METEOR, ROUGE_L and CIDEr need Java; asking for them
    without Java raises ``UserError`` before any work. METEOR runs in this process's
    shared METEOR process (`coco.shared_meteor`), or in the open ``coco.Meteor`` passed. Returns
    ``{metric: score}`` in the order asked.
    """
    metrics = check_metrics(metrics)
    _check_corpus(refs, hyps)
    coco.require_java(metrics)

    def mteval_scores() -> dict[str, float]:
        out = {}
        if "BLEU" in metrics:
            out["BLEU"] = mteval.bleu(refs, hyps)
        if "NIST" in metrics:
            out["NIST"] = mteval.nist(refs, hyps)
        return out

    scores = _coco_scores(refs, hyps, metrics, mteval_scores, meteor)
    return {m: scores[m] for m in metrics}


def score_bleu_meteor(refs: Sequence[Sequence[str]], hyps: Sequence[str],
                      metrics: Sequence[str] = ("BLEU", "METEOR"),
                      meteor: coco.Meteor | None = None) -> dict[str, float]:
    """BLEU and METEOR for WebNLG and DART, both on the 0..1 scale.

    BLEU is sacrebleu's ``corpus_bleu`` (13a tokenization, case-sensitive, closest reference
    length, references padded with ``None`` where a segment has fewer). METEOR is the E2E
    METEOR above (PTB-tokenized, lowercased, ``-norm``, stdio ``EVAL`` aggregation).

    Not identical to the official WebNLG/DART script (WebNLG GenerationEval ``eval.py``):
    its BLEU is Moses ``multi-bleu-detok.perl`` reported on 0..100, and where a segment has
    fewer than ``num_refs`` references it pads with empty strings, which count in the
    closest-length rule; its METEOR runs the same jar in file mode on NLTK
    ``word_tokenize`` text with those empty references included. Numbers are close to the
    official ones but not identical; say which scorer was used when comparing with papers.
    """
    metrics = check_metrics(metrics, allowed=("BLEU", "METEOR"))
    _check_corpus(refs, hyps)
    coco.require_java(metrics, others="BLEU")

    def bleu() -> dict[str, float]:
        if "BLEU" not in metrics:
            return {}
        width = max(len(group) for group in refs)
        streams = [[g[k] if k < len(g) else None for g in refs] for k in range(width)]
        return {"BLEU": sacrebleu.corpus_bleu(list(hyps), streams).score / 100}

    scores = _coco_scores(refs, hyps, metrics, bleu, meteor)
    return {m: scores[m] for m in metrics}
