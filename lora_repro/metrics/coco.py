"""METEOR, ROUGE-L and CIDEr as the E2E challenge computes them, via ``pycocoevalcap``.

``measure_scores.py`` of github.com/tuetschek/e2e-metrics runs its fork of the MS-COCO
caption evaluation (``COCOEvalCap.evaluate``): references and hypotheses are tokenized by
the Stanford PTBTokenizer (CoreNLP 3.4.1, ``-preserveLines -lowerCase``, punctuation tokens
dropped), then METEOR 1.5 (``-l en -norm``, corpus statistics aggregated with ``EVAL``),
ROUGE-L (LCS F-measure, beta 1.2) and CIDEr (the coco-caption scorer, i.e. CIDEr-D:
sigma 6, clipped counts, idf from the references, times 10) score the tokenized text.

The installed ``pycocoevalcap`` (salaniz, 1.2) ships the same jars and the same ROUGE-L and
CIDEr code as that fork, and those two scorers are used as they are. Its tokenizer and
METEOR wrappers are re-written here, with the same Java commands and the same text in and
out, because the library's versions print Java's progress to stderr, write temporary files
into site-packages, and talk to METEOR one line at a time. Both jars need Java: without
it, only BLEU and NIST can be computed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_module
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer as _ptb_module

from lora_repro.errors import UserError

JAVA_METRICS = ("METEOR", "ROUGE_L", "CIDEr")
PTB_JAR = Path(_ptb_module.__file__).with_name(_ptb_module.STANFORD_CORENLP_3_4_1_JAR)
METEOR_JAR = Path(_meteor_module.__file__).with_name(_meteor_module.METEOR_JAR)
PUNCTUATIONS = frozenset(_ptb_module.PUNCTUATIONS)


def require_java(metrics: Sequence[str], others: str = "BLEU,NIST") -> None:
    """Raise ``UserError`` when any of ``metrics`` needs Java and ``java`` is not on PATH.

    ``others`` names the metrics that can still be computed, for the message.
    """
    needing = [m for m in metrics if m in JAVA_METRICS]
    if needing and shutil.which("java") is None:
        verb = "needs" if len(needing) == 1 else "need"
        raise UserError(
            f"{', '.join(needing)} {verb} Java (METEOR 1.5 and the Stanford PTB tokenizer "
            "are Java programs) and `java` is not on PATH; install a Java runtime, or pass "
            f"--metrics {others} to compute the others")


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """Tokenize like ``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer.tokenize``.

    One Java call over a file holding one sentence per line; the output is lowercased,
    PTB-escaped (``£`` becomes ``#``, brackets ``-lrb-``) and the punctuation tokens in
    ``PUNCTUATIONS`` are removed. Returns one space-joined string per sentence.
    """
    text = "\n".join(s.replace("\n", " ") for s in sentences)
    with tempfile.TemporaryDirectory(prefix="ptb-") as tmp:
        path = Path(tmp) / "sentences.txt"
        path.write_bytes(text.encode("utf-8"))
        cmd = ["java", "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", str(path)]
        proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed: {proc.stderr.decode(errors='replace')[-500:]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) < len(sentences):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(sentences)}")
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)
        for line in lines[: len(sentences)]
    ]


class Meteor:
    """METEOR 1.5 in ``-stdio`` mode, as ``pycocoevalcap.meteor.meteor.Meteor``.

    A context manager: the JVM starts on ``__enter__`` (loading the paraphrase table takes
    seconds, so start it before other work) and is closed on ``__exit__``. ``score`` sends
    one ``SCORE ||| ref_1 ||| ... ||| ref_k ||| hyp`` line per segment, then a single
    ``EVAL`` line with all the segment statistics, and returns the corpus score METEOR
    computes from the summed statistics (not the mean of segment scores).
    """

    CMD = ("java", "-jar", "-Xmx2G", METEOR_JAR.name, "-", "-", "-stdio", "-l", "en", "-norm")

    def __enter__(self) -> Meteor:
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            self.CMD, cwd=METEOR_JAR.parent, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr,
        )
        return self

    def __exit__(self, *exc) -> None:
        self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._stderr):
            with contextlib.suppress(OSError):  # unflushed input to a dead process
                stream.close()

    def _write_lines(self, lines: Sequence[str]) -> None:
        try:
            for line in lines:
                self._proc.stdin.write(line.encode("utf-8") + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # the reader reports the failure

    def _read_line(self) -> str:
        line = self._proc.stdout.readline()
        if not line:
            self._stderr.seek(0)
            tail = self._stderr.read().decode(errors="replace")[-500:]
            raise RuntimeError(f"METEOR stopped unexpectedly: {tail}")
        return line.decode("utf-8").strip()

    def segment_stats(self, refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> list[str]:
        """METEOR's sufficient statistics of each segment (``SCORE`` lines), in order."""
        score_lines = [
            " ||| ".join(("SCORE", " ||| ".join(group),
                          hyp.replace("|||", "").replace("  ", " ")))
            for group, hyp in zip(refs, hyps, strict=True)
        ]
        # Write from a thread: METEOR answers each line, and a full stdout pipe would
        # otherwise block both processes on a large corpus.
        writer = threading.Thread(target=self._write_lines, args=(score_lines,), daemon=True)
        writer.start()
        stats = [self._read_line() for _ in score_lines]
        writer.join()
        return stats

    def aggregate(self, stats: Sequence[str]) -> float:
        """Corpus METEOR of segments from their `segment_stats` (one ``EVAL`` line)."""
        self._write_lines([" ||| ".join(["EVAL", *stats])])
        for _ in stats:  # per-segment scores, unused
            self._read_line()
        return float(self._read_line())

    def score(self, refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> float:
        """Corpus METEOR of PTB-tokenized ``hyps`` against PTB-tokenized ``refs``."""
        return self.aggregate(self.segment_stats(refs, hyps))


_SHARED: dict[int, Meteor] = {}  # this process's METEOR (by pid: a forked child starts its own)
_SHARED_LOCK = threading.RLock()


@contextlib.contextmanager
def shared_meteor():
    """This process's METEOR, started on first use and kept until the process exits, held
    for the caller alone while the block runs.

    Each start costs about 10 CPU seconds (the JVM loads METEOR's paraphrase table), so a
    process that scores several times pays it once: the jobs of a sweep run one after
    another in one process, `evaluate score` of several runs, the test suite. If the block
    raises, the process is closed (it may be mid-answer) and the next use starts another."""
    with _SHARED_LOCK:
        meteor = _SHARED.get(os.getpid())
        if meteor is None or meteor._proc.poll() is not None:
            meteor = _SHARED[os.getpid()] = Meteor().__enter__()
            atexit.register(meteor.__exit__)
        try:
            yield meteor
        except BaseException:
            meteor.__exit__()
            _SHARED.pop(os.getpid(), None)
            raise


def _as_dicts(refs: Sequence[Sequence[str]], hyps: Sequence[str]):
    """COCO's ``gts`` / ``res`` dicts keyed by segment index, in corpus order."""
    return {i: list(g) for i, g in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}


def rouge_l(refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> float:
    """Mean segment ROUGE-L of tokenized text (``pycocoevalcap.rouge.Rouge``)."""
    return float(Rouge().compute_score(*_as_dicts(refs, hyps))[0])


def cider(refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> float:
    """Corpus CIDEr(-D) of tokenized text (``pycocoevalcap.cider.Cider``, n=4, sigma=6)."""
    return float(Cider().compute_score(*_as_dicts(refs, hyps))[0])


def tokenize_corpus(refs: Sequence[Sequence[str]], hyps: Sequence[str]):
    """PTB-tokenize references and hypotheses in two calls, as ``COCOEvalCap.evaluate``."""
    flat = ptb_tokenize([r for group in refs for r in group])
    tok_refs, start = [], 0
    for group in refs:
        tok_refs.append(flat[start:start + len(group)])
        start += len(group)
    return tok_refs, ptb_tokenize(hyps)
