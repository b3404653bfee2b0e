"""BLEU and NIST exactly as the E2E challenge computes them (`measure_scores.py -p`).

The E2E script's ``-p`` flag scores with ``metrics/pymteval.py`` of
github.com/tuetschek/e2e-metrics, a Python port of NIST's ``mteval-v13a.pl``. Its
conventions, all mirrored here:

- tokenization is mteval-v13a's "basic" tokenization; matching is case-insensitive
  (tokens are lowercased after tokenizing);
- BLEU is corpus-level with the references of each segment merged by max count; the
  brevity penalty uses, per segment, the reference closest in length to the hypothesis
  (ties go to the shorter one);
- the candidate n-gram total of a segment is ``len(hyp) - n + 1`` even where that is
  negative (hypotheses shorter than n tokens), and zero precisions are floored at
  ``1e-15 / 1e-9`` instead of making BLEU zero;
- NIST information weights come from the n-gram counts of *all* references of the whole
  corpus, and its length penalty compares the hypothesis length with the sum over segments
  of the *average* reference length.

Hand-written because no library implements pymteval's multi-reference NIST, and
sacrebleu's BLEU differs from pymteval on the last two BLEU points above (its 13a
tokenizer is identical and is used).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

Tokens = list[str]
NGram = tuple[str, ...]

_TOKENIZER_13A = Tokenizer13a()
# pymteval.BLEUScore: floors applied to zero hit / candidate counts.
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9
# mteval-v13a.pl: the NIST penalty is 0.5 when the length ratio is 2/3.
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def tokenize_13a(sentence: str) -> Tokens:
    """mteval-v13a basic tokenization, as ``pymteval.NGramScore.tokenize``.

    sacrebleu's ``Tokenizer13a`` applies the same regexes; splitting its output on single
    spaces keeps pymteval's quirk that an empty sentence is one empty token.
    """
    return _TOKENIZER_13A(sentence).split(" ")


def _lower_tokens(sentence: str) -> Tokens:
    """pymteval matches case-insensitively: tokens are lowercased after tokenizing."""
    return [token.lower() for token in tokenize_13a(sentence)]


def ngrams(tokens: Sequence[str], n: int) -> list[NGram]:
    """All n-grams of ``tokens`` in order (none when ``len(tokens) < n``)."""
    return list(zip(*[tokens[i:] for i in range(n)], strict=False))


def max_ref_counts(refs: Sequence[Tokens], n: int) -> Counter[NGram]:
    """For each n-gram, its largest count in any single reference (``get_ngram_counts``)."""
    merged: Counter[NGram] = Counter()
    for ref in refs:
        merged |= Counter(ngrams(ref, n))
    return merged


def clipped_hits(hyp: Tokens, refs: Sequence[Tokens], n: int) -> Counter[NGram]:
    """Hypothesis n-gram counts clipped by ``max_ref_counts`` (zero-count n-grams dropped)."""
    return Counter(ngrams(hyp, n)) & max_ref_counts(refs, n)


def _tokenize_corpus(refs: Sequence[Sequence[str]],
                     hyps: Sequence[str]) -> list[tuple[Tokens, list[Tokens]]]:
    """``(hypothesis tokens, [reference tokens])`` per segment, lowercased."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference groups")
    if not hyps:
        raise ValueError("cannot score an empty corpus")
    if any(len(group) == 0 for group in refs):
        raise ValueError("every hypothesis needs at least one reference")
    return [(_lower_tokens(hyp), [_lower_tokens(r) for r in group])
            for hyp, group in zip(hyps, refs, strict=True)]


def closest_ref_length(hyp_len: int, ref_lens: Sequence[int]) -> int:
    """The reference length closest to ``hyp_len``; a tie goes to the shorter reference."""
    return min(ref_lens, key=lambda ref_len: (abs(ref_len - hyp_len), ref_len))


def bleu(refs: Sequence[Sequence[str]], hyps: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU on the 0..1 scale, mirroring ``pymteval.BLEUScore(smoothing=0)``.

    Args:
        refs: one list of reference strings per segment.
        hyps: one hypothesis string per segment.
        max_n: the largest n-gram order (4 in the E2E challenge).
    """
    hits = [0] * max_n
    cand_lens = [0] * max_n
    ref_len = 0
    for hyp, ref_toks in _tokenize_corpus(refs, hyps):
        for i in range(max_n):
            hits[i] += sum(clipped_hits(hyp, ref_toks, i + 1).values())
            cand_lens[i] += len(hyp) - i  # may be negative: pymteval does not clip it
        ref_len += closest_ref_length(len(hyp), [len(r) for r in ref_toks])
    log_prec = sum(math.log(max(h, _BLEU_TINY) / max(c, _BLEU_SMALL))
                   for h, c in zip(hits, cand_lens, strict=True))
    penalty = 1.0
    if cand_lens[0] <= ref_len:
        penalty = math.exp(1.0 - ref_len / (cand_lens[0] if cand_lens[0] else 1e-5))
    return penalty * math.exp(log_prec / max_n)


def nist_info(ref_counts: Sequence[Counter[NGram]], ngram: NGram) -> float:
    """NIST information weight ``log2(count(w_1..w_{n-1}) / count(w_1..w_n))``.

    ``ref_counts[k]`` counts every k-gram over all references of the corpus;
    ``ref_counts[0][()]`` is the total number of reference tokens.
    """
    count = ref_counts[len(ngram)][ngram]
    if count == 0:
        return 0.0
    return math.log2(ref_counts[len(ngram) - 1][ngram[:-1]] / count)


def nist_length_penalty(hyp_len: float, avg_ref_len: float) -> float:
    """``exp(-beta * log(ratio)^2)`` for ratio = hyp_len / avg_ref_len below 1, else 1."""
    ratio = hyp_len / avg_ref_len
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-_NIST_BETA * math.log(ratio) ** 2)


def nist(refs: Sequence[Sequence[str]], hyps: Sequence[str], max_n: int = 5) -> float:
    """Corpus NIST, mirroring ``pymteval.NISTScore``.

    ``sum_n [sum over hit n-grams of info * hits] / [hypothesis n-gram total]`` times the
    length penalty. Where pymteval would divide by a zero n-gram total (a corpus of very
    short hypotheses) the total is taken as 1, as the lxuechen/e2e-metrics fork does.
    """
    ref_counts: list[Counter[NGram]] = [Counter() for _ in range(max_n + 1)]
    seg_hits: list[list[Counter[NGram]]] = [[] for _ in range(max_n)]
    cand_lens = [0] * max_n
    avg_ref_len = 0.0
    for hyp, ref_toks in _tokenize_corpus(refs, hyps):
        for i in range(max_n):
            cand_lens[i] += len(hyp) - i
            seg_hits[i].append(clipped_hits(hyp, ref_toks, i + 1))
            for ref in ref_toks:
                ref_counts[i + 1].update(ngrams(ref, i + 1))
        ref_len_sum = sum(len(r) for r in ref_toks)
        ref_counts[0][()] += ref_len_sum
        avg_ref_len += ref_len_sum / len(ref_toks)
    score = 0.0
    for i in range(max_n):
        info = sum(nist_info(ref_counts, ngram) * count
                   for hits in seg_hits[i] for ngram, count in hits.items())
        score += info / (cand_lens[i] or 1)
    return nist_length_penalty(cand_lens[0], avg_ref_len) * score
