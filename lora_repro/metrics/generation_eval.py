"""WebNLG and DART scores as the LoRA paper computes them (Tables 13 and 14).

The official pipeline (github.com/microsoft/LoRA, ``examples/NLG/README.md``) is:

1. ``src/gpt2_decode.py --ref_num 6 --tokenize --lower`` writes outputs and references
   lowercased, then split around every non-word character (`post_process`). References
   past the 6th of a source are dropped and a source with fewer is padded with its first
   (`official_references`), giving files ``reference0`` .. ``reference5``.
2. ``eval.py -nr 6 -m bleu,meteor,ter`` of github.com/WebNLG/GenerationEval scores them:

   - BLEU: Moses ``multi-bleu-detok.perl`` on those files: mteval-v13a tokenization,
     case-sensitive, 4-grams, max-count clipping over references, closest reference length
     (ties to the shorter), no smoothing. sacrebleu's ``corpus_bleu(tokenize="13a",
     smooth_method="none")`` is the same computation and is used here.
   - METEOR 1.5 ``-l en -norm -r 6`` on text re-tokenized by NLTK ``word_tokenize``
     (`nltk_tokenize`); the corpus score comes from summed segment statistics, which
     ``coco.Meteor`` (the same jar in ``-stdio`` mode) computes with one JVM for all parts.
   - TER: the mean over segments of the smallest ``pyter.ter(hyp.split(), ref.split())``
     over references, an empty reference counting 1. pyter (``pyter3``, as GenerationEval
     pins) is used itself: its greedy shift search is not tercom's, so sacrebleu's TER
     differs.

   Run literally, the README's commands cannot give the paper's METEOR: gpt2_decode ends
   every file with a newline, eval.py reads them with ``read().split('\\n')``, so one extra
   empty segment appears, and METEOR 1.5 then stops ("test and reference not same length",
   eval.py reports -1). Files without the final newline, as GenerationEval's own examples
   are, score n segments in every metric; that is what is computed here. (Had TER kept the
   extra segment it would be (sum + 1) / (n + 1), higher by under 0.001 on WebNLG's test.)

3. WebNLG's seen / unseen parts: ``gpt2_decode.py --filter seen|unseen`` keeps the reference
   lines whose entry's category is (not) a training category, and steps 1-2 run on each
   part alone (`split_parts`).

Scales: BLEU on 0..1 (GenerationEval prints 100 x this, with 2 decimals), as the toolkit's
E2E BLEU; METEOR and TER on GenerationEval's own 0..1 scale.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from contextlib import ExitStack

import pyter
import sacrebleu
from nltk.tokenize import word_tokenize

from lora_repro.errors import UserError
from lora_repro.metrics import coco

GENERATION_EVAL_METRICS = ("BLEU", "METEOR", "TER")
NUM_REFS = 6  # gpt2_decode.py --ref_num 6, eval.py -nr 6
# Suffixes of the seen / unseen parts' keys (BLEU_S, BLEU_U); the whole set has none.
PARTS = {"S": True, "U": False}
_NON_WORD = re.compile(r"(\W)")


def standard_tokenize(sent: str) -> str:
    """``gpt2_decode.stardard_tokenize``: every non-word character becomes its own token.

    >>> standard_tokenize("Aarhus' leader (Jacob) is 1.5m.")
    "Aarhus ' leader ( Jacob ) is 1 . 5m ."
    """
    return " ".join(" ".join(_NON_WORD.split(sent)).split())


def post_process(sent: str) -> str:
    """``gpt2_decode.post_process(sent, is_tokenize=True, is_lower=True)``: lower, then split."""
    return standard_tokenize(sent.lower())


def official_references(refs: Sequence[str], num_refs: int = NUM_REFS) -> list[str]:
    """The ``num_refs`` references gpt2_decode writes: the first ``num_refs``, padded with
    the first reference where a source has fewer."""
    return [refs[k] if k < len(refs) else refs[0] for k in range(num_refs)]


def nltk_tokenize(text: str) -> str:
    """``' '.join(nltk.word_tokenize(text))`` as eval.py applies it before METEOR and TER.

    ``preserve_line=True`` skips NLTK's Punkt sentence splitter (its model is a separate
    download). For `post_process` output that changes nothing: every non-word character
    already stands alone, so the splitter can only cut at spaces, and each word-tokenizer
    rule that still applies (``"`` -> `````, ``cannot`` -> ``can not``, ...) sees one token.
    """
    return " ".join(word_tokenize(text, preserve_line=True))


def ter(seg_ters: Sequence[float]) -> float:
    """eval.py's TER: the mean over segments (see the module docstring on the empty one)."""
    return sum(seg_ters) / len(seg_ters)


def bleu(refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> float:
    """multi-bleu-detok.perl's corpus BLEU on 0..1 (see the module docstring).

    refs: ``NUM_REFS`` post-processed references per segment; hyps: one per segment.
    """
    streams = [[group[k] for group in refs] for k in range(len(refs[0]))]
    result = sacrebleu.corpus_bleu(list(hyps), streams, tokenize="13a", smooth_method="none",
                                   force=True)
    return result.score / 100


def segment_ter(hyp: str, refs: Sequence[str]) -> float:
    """eval.py's TER of one tokenized hypothesis: the smallest ``pyter.ter`` over its
    references (each distinct one once), an empty reference counting 1."""
    def one(ref: str) -> float:
        if not ref:
            return 1.0
        try:
            return pyter.ter(hyp.split(), ref.split())
        except ZeroDivisionError:  # eval.py's bare except: a reference of spaces only
            return 1.0

    return min(one(ref) for ref in dict.fromkeys(refs))


def split_parts(refs: Sequence[Sequence[str]], seen: Sequence[Sequence[bool]] | None
                ) -> dict[str, tuple[list[int], list[list[str]]]]:
    """Key suffix -> (source indices, their references) of each part scored on its own.

    "" is every source with all its references. With ``seen`` (per source, one flag per
    reference: is its entry's category a training category) also "_S" and "_U" where not
    empty: as ``gpt2_decode.py --filter seen|unseen``, which filters reference lines, a part
    holds each source with at least one reference of that kind, with only those references.
    """
    out = {"": (list(range(len(refs))), [list(g) for g in refs])}
    if seen is None:
        return out
    for suffix, flag in PARTS.items():
        idx, groups = [], []
        for i, (group, flags) in enumerate(zip(refs, seen, strict=True)):
            kept = [r for r, f in zip(group, flags, strict=True) if bool(f) == flag]
            if kept:
                idx.append(i)
                groups.append(kept)
        if idx:
            out[f"_{suffix}"] = (idx, groups)
    return out


def _check(refs: Sequence[Sequence[str]], hyps: Sequence[str], seen) -> None:
    if len(refs) != len(hyps):
        raise UserError(f"{len(hyps)} hypotheses but {len(refs)} sources; give one output "
                        "line per distinct source, in the order of the references file")
    if not hyps:
        raise UserError("nothing to score: no hypotheses")
    if any(len(group) == 0 for group in refs):
        raise UserError("every source needs at least one reference")
    if seen is not None and [len(s) for s in seen] != [len(g) for g in refs]:
        raise UserError("seen/unseen flags must give one flag per reference of each source")


class _Segments:
    """Per-segment METEOR statistics and TER of tokenized (references, hypothesis) pairs,
    each computed once although a segment is in the whole set and in a part."""

    def __init__(self, meteor: coco.Meteor | None):
        self.meteor = meteor
        self._stats: dict[tuple, str] = {}
        self._ter: dict[tuple, float] = {}

    def meteor_stats(self, keys: list[tuple]) -> list[str]:
        new = list(dict.fromkeys(k for k in keys if k not in self._stats))
        if new:
            stats = self.meteor.segment_stats([list(k[0]) for k in new], [k[1] for k in new])
            self._stats |= dict(zip(new, stats, strict=True))
        return [self._stats[k] for k in keys]

    def ters(self, keys: list[tuple]) -> list[float]:
        for key in keys:
            if key not in self._ter:
                self._ter[key] = segment_ter(key[1], key[0])
        return [self._ter[k] for k in keys]


def score_generation_eval(refs: Sequence[Sequence[str]], hyps: Sequence[str],
                          seen: Sequence[Sequence[bool]] | None = None,
                          metrics: Sequence[str] = GENERATION_EVAL_METRICS,
                          meteor: coco.Meteor | None = None) -> dict[str, float]:
    """BLEU, METEOR and TER of raw ``hyps`` (one per source) against raw ``refs`` as the
    official pipeline scores them (module docstring); with ``seen`` (see `split_parts`)
    also ``BLEU_S``, ``BLEU_U``, ... for the seen and unseen parts, each scored on its own.

    METEOR needs Java (``UserError`` before any work without it). Keys: the whole set's,
    then each part's, metrics in the order asked.
    """
    from lora_repro.metrics import check_metrics  # the package imports this module

    metrics = check_metrics(metrics, allowed=GENERATION_EVAL_METRICS)
    _check(refs, hyps, seen)
    coco.require_java(metrics, others="BLEU,TER")
    processed = functools.cache(post_process)
    tokenized = functools.cache(lambda text: nltk_tokenize(processed(text)))
    scores = {}
    with ExitStack() as stack:
        if "METEOR" in metrics and meteor is None:
            meteor = stack.enter_context(coco.shared_meteor())  # loads while the rest runs
        segments = _Segments(meteor)
        for suffix, (idx, groups) in split_parts(refs, seen).items():
            groups = [official_references(g) for g in groups]
            keys = [(tuple(tokenized(r) for r in g), tokenized(hyps[i]))
                    for i, g in zip(idx, groups, strict=True)]
            for m in metrics:
                if m == "BLEU":
                    value = bleu([[processed(r) for r in g] for g in groups],
                                 [processed(hyps[i]) for i in idx])
                elif m == "METEOR":
                    value = meteor.aggregate(segments.meteor_stats(keys))
                else:
                    value = ter(segments.ters(keys))
                scores[f"{m}{suffix}"] = value
    return scores
