"""Tests of the E2E metrics: hand-computed tiny cases, the official reference point, the CLI.

Expected values below are worked out on paper from the definitions in pymteval.py
(BLEU, NIST) and the coco-caption scorers (ROUGE-L, CIDEr, METEOR 1.5); the reference
point is the score of the official ``measure_scores.py -p`` on a published system output.
"""

import json
import math
import re
import shutil
import subprocess
import sys

import pytest

from lora_repro.errors import UserError
from lora_repro.evaluate import main
from lora_repro.metrics import (
    check_metrics,
    coco,
    read_hyps,
    read_refs_csv,
    score_bleu_meteor,
    score_e2e,
)
from lora_repro.metrics.mteval import bleu, nist, nist_length_penalty, tokenize_13a

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")


@pytest.fixture(scope="module")
def meteor():
    """The process's METEOR (it takes seconds to load its paraphrase table)."""
    if shutil.which("java") is None:
        pytest.skip("needs Java")
    with coco.shared_meteor() as scorer:
        yield scorer


def test_shared_meteor_starts_once_and_is_replaced_after_an_error(monkeypatch):
    started = []

    class FakeMeteor:  # no JVM: only the sharing is under test
        def __enter__(self):
            self._proc = type("P", (), {"poll": lambda _: self.exit_code})()
            self.exit_code = None
            started.append(self)
            return self

        def __exit__(self, *exc):
            self.exit_code = -9

    monkeypatch.setattr(coco, "Meteor", FakeMeteor)
    monkeypatch.setattr(coco, "_SHARED", {})
    with coco.shared_meteor() as first:
        pass
    with coco.shared_meteor() as again:
        assert again is first and len(started) == 1
    with pytest.raises(KeyError), coco.shared_meteor():
        raise KeyError("mid-answer")
    assert first.exit_code == -9  # closed: it may have been mid-answer
    with coco.shared_meteor() as fresh:
        assert fresh is not first and len(started) == 2
    fresh.__exit__()  # a process that died on its own is replaced too
    with coco.shared_meteor() as third:
        assert third is not fresh and len(started) == 3


def test_a_run_that_will_score_starts_meteor_up_front_when_java_is_there(monkeypatch):
    from lora_repro import decoding

    started = []

    class FakeMeteor:  # no JVM: only when it starts is under test
        def __enter__(self):
            self._proc = type("P", (), {"poll": lambda _: None})()
            started.append(self)
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(coco, "Meteor", FakeMeteor)
    monkeypatch.setattr(coco, "_SHARED", {})
    monkeypatch.setattr(decoding.shutil, "which", lambda name: None)
    decoding.start_scoring("e2e")
    assert started == []  # without Java the scoring skips METEOR: nothing to start
    monkeypatch.setattr(decoding.shutil, "which", lambda name: f"/usr/bin/{name}")
    decoding.start_scoring("e2e")
    with coco.shared_meteor() as meteor:  # the scoring, later, finds it running
        assert started == [meteor]


# ---- the reference point (first, so that METEOR's JVM loads while Python works) --------

# measure_scores.py -p on the E2E test set with TGen's output (tgen-std.run0).
TGEN_OFFICIAL = {"BLEU": 0.6616, "NIST": 8.5446, "METEOR": 0.4504, "ROUGE_L": 0.6914,
                 "CIDEr": 2.2312}
TOLERANCE = {"BLEU": 1e-3, "NIST": 1e-2, "METEOR": 2e-3, "ROUGE_L": 1e-3, "CIDEr": 1e-2}


@pytest.fixture(scope="module")
def e2e_scores(meteor):
    """``e2e_scores(shared_dir, system)``: official-scale scores, computed once per module.

    A cache rather than a module fixture taking ``shared_dir``, which is function-scoped.
    """
    cache = {}

    def score(shared_dir, system):
        if system not in cache:
            data = shared_dir / "data" / "e2e"
            _, refs = read_refs_csv(data / "testset_w_refs.csv")
            hyps = read_hyps(data / "system-outputs" / f"{system}.run0.txt")
            cache[system] = score_e2e(refs, hyps, meteor=meteor)
        return cache[system]

    return score


def test_reference_point_tgen(shared_dir, e2e_scores):
    got = e2e_scores(shared_dir, "tgen-std")
    assert list(got) == list(TGEN_OFFICIAL)
    for metric, value in TGEN_OFFICIAL.items():
        assert got[metric] == pytest.approx(value, abs=TOLERANCE[metric]), metric


def test_sclstm_scores_below_tgen(shared_dir, e2e_scores):
    # No published scores of this single run were found (the paper that released it,
    # Dusek et al. INLG 2019, gives 5-run means). A weaker check: its outputs repeat and
    # truncate sentences, so every metric must rank it below TGen, and stay in range.
    sclstm, tgen = e2e_scores(shared_dir, "sclstm"), e2e_scores(shared_dir, "tgen-std")
    for metric in TGEN_OFFICIAL:
        assert 0 < sclstm[metric] < tgen[metric], metric
    assert all(sclstm[m] <= 1 for m in ("BLEU", "METEOR", "ROUGE_L"))


# ---- mteval-v13a tokenization ----------------------------------------------------------


def test_tokenize_13a_splits_punctuation_but_not_numbers_or_apostrophes():
    assert tokenize_13a("Prices: £20-25, isn't it?") == [
        "Prices", ":", "£20", "-", "25", ",", "isn't", "it", "?"]
    assert tokenize_13a("3.5 &amp; 1,000.") == ["3.5", "&", "1,000", "."]


def test_tokenize_13a_empty_sentence_is_one_empty_token():
    # pymteval splits "" on " ": an empty output still counts one token.
    assert tokenize_13a("") == [""]


# ---- BLEU (pymteval.BLEUScore) ---------------------------------------------------------


def test_bleu_two_segment_corpus_case_insensitive():
    # seg 1 matches exactly: hits = totals = 5, 4, 3, 2 (1- to 4-grams).
    # seg 2 "A b x" vs {"a b y", "z"}: 1-grams a, b hit (2/3); 2-gram "a b" (1/2);
    # 3-gram 0/1; 4-gram 0/0.  Corpus: 7/8, 5/6, 3/4, 2/2; hyp length 8 = ref length 8.
    refs = [["a b c d e"], ["a b y", "z"]]
    hyps = ["a b c d e", "A b x"]
    expected = (7 / 8 * 5 / 6 * 3 / 4 * 2 / 2) ** 0.25
    assert bleu(refs, hyps) == pytest.approx(expected, rel=1e-12)


def test_bleu_brevity_penalty_uses_closest_reference():
    # Perfect precision; closest reference has 6 tokens vs 4: BP = exp(1 - 6/4).
    assert bleu([["a b c d e f", "a b c d e f g h"]], ["a b c d"]) == pytest.approx(
        math.exp(-0.5), rel=1e-12)


def test_bleu_length_tie_goes_to_shorter_reference():
    # References of 3 and 5 tokens are both 1 away from 4: the 3 is taken, so no penalty.
    assert bleu([["a b c", "a b c d e"]], ["a b c d"]) == pytest.approx(1.0, rel=1e-12)


def test_bleu_short_hypotheses_count_negative_ngram_totals():
    # pymteval adds len(hyp) - n + 1 even when negative: the 2-token hyp adds -1 to the
    # 4-gram total, which becomes 3 + (-1) = 2 for 3 hits, so BLEU exceeds 1.
    refs = [["a b c d e f"], ["a b"]]
    assert bleu(refs, ["a b c d e f", "a b"]) == pytest.approx(1.5 ** 0.25, rel=1e-12)


def test_bleu_without_matches_is_floored_not_zero():
    # Zero hits are floored at 1e-15: BLEU = 1e-15 / (4 * 3 * 2 * 1) ** (1/4).
    assert bleu([["a b c d"]], ["w x y z"]) == pytest.approx(1e-15 / 24 ** 0.25, rel=1e-9)


# ---- NIST (pymteval.NISTScore) ---------------------------------------------------------


def test_nist_information_weights_single_segment():
    # Reference counts: 8 tokens; a:2 b:2 c,d,e,x:1; ab:2, bc:1 ...; abc:1 ...
    # 1-grams: log2(8/2)*2 + log2(8/1)*3 = 13, over 5 -> 2.6
    # 2-grams: ab log2(2/2)=0, bc log2(2/1)=1, cd 0, de 0 -> 1/4
    # 3-grams: abc log2(2/1)=1, others 0 -> 1/3; 4-, 5-grams carry no information.
    # Hyp length 5 > average reference length 4: no penalty.
    assert nist([["a b c d e", "a b x"]], ["a b c d e"]) == pytest.approx(
        2.6 + 0.25 + 1 / 3, rel=1e-12)


def test_nist_information_comes_from_all_references_of_the_corpus():
    # 10 reference tokens in all, "a" 6 times (1 + 5 in the second segment's reference).
    # seg 1 hits: a -> log2(10/6), b..e -> log2(10) each; 2-gram ab -> log2(6/1).
    # seg 2 hits nothing. Totals: 10 unigrams, 8 bigrams; lengths 10 vs 10.
    refs = [["a b c d e"], ["a a a a a"]]
    hyps = ["a b c d e", "f g h i j"]
    expected = (math.log2(10 / 6) + 4 * math.log2(10)) / 10 + math.log2(6) / 8
    assert nist(refs, hyps) == pytest.approx(expected, rel=1e-12)


def test_nist_zero_ngram_total_is_taken_as_one():
    # 2-token hyp: n-gram totals 2, 1, 0, -1, -2. Reference tokens 4 (a:2, b:1, c:1).
    # 1-grams: log2(4/2) + log2(4/1) = 3 over 2; 2-gram ab: log2(2/1) = 1 over 1; the
    # 3-gram total 0 (pymteval divides by zero there) counts as 1 and adds nothing.
    assert nist([["a b", "a c"]], ["a b"]) == pytest.approx(1.5 + 1.0, rel=1e-12)


def test_nist_length_penalty():
    # mteval-v13a: the penalty is 0.5 at a length ratio of 2/3, 1 from ratio 1 up.
    assert nist_length_penalty(2, 3) == pytest.approx(0.5, rel=1e-12)
    assert nist_length_penalty(5, 4) == 1.0
    # Half the reference length: 0.5 ** ((ln 0.5 / ln 1.5) ** 2); unigram info log2(10).
    penalty = 0.5 ** ((math.log(0.5) / math.log(1.5)) ** 2)
    assert nist([["a b c d e f g h i j"]], ["a b c d e"]) == pytest.approx(
        math.log2(10) * penalty, rel=1e-12)


# ---- ROUGE-L and CIDEr (coco-caption scorers, pure Python) -----------------------------


def test_rouge_l_takes_max_precision_and_max_recall_over_references():
    # LCS("a b c d", "a c d e f") = 3: P = 3/5, R = 3/4, beta = 1.2.
    f = (1 + 1.44) * 0.6 * 0.75 / (0.75 + 1.44 * 0.6)
    assert coco.rouge_l([["a b c d"]], ["a c d e f"]) == pytest.approx(f, rel=1e-12)
    # Two references: P = max(2/3, 1/3), R = max(2/2, 1/6), from different references.
    f2 = (1 + 1.44) * (2 / 3) * 1 / (1 + 1.44 * 2 / 3)
    assert coco.rouge_l([["a b", "c d e f g h"]], ["a b c"]) == pytest.approx(f2, rel=1e-12)


def test_cider_d_idf_mean_over_n_and_times_ten():
    # Two segments, so idf = log(2) - log(df). Segment 1 matches its reference on the
    # 1-grams and the 2-gram (cosine 1 each) and has no 3-, 4-grams: 10 * mean(1,1,0,0) = 5.
    # Segment 2 shares nothing: 0. CIDEr = mean(5, 0).
    assert coco.cider([["a b"], ["d"]], ["a b", "c"]) == pytest.approx(2.5, rel=1e-12)


# ---- Java: PTB tokenizer and METEOR ----------------------------------------------------


@needs_java
def test_ptb_tokenize_lowercases_escapes_and_drops_punctuation():
    out = coco.ptb_tokenize(['Prices are £20-25, café "ok".', "",
                             "The Eagle (near Café Rouge) isn't cheap..."])
    assert out == ["prices are # 20-25 café ok", "",
                   "the eagle -lrb- near café rouge -rrb- is n't cheap"]


def test_meteor_fragmentation_penalty(meteor):
    # All words match but in 2 chunks of 1: penalty 0.6 * (2/2) ** 0.2, Fmean 1.
    assert meteor.score([["dog cat"]], ["cat dog"]) == pytest.approx(0.4, abs=1e-9)
    # A perfect match gets no penalty at all.
    assert meteor.score([["a b c d"]], ["a b c d"]) == pytest.approx(1.0, abs=1e-9)
    # The corpus score comes from summed statistics, not the mean of segment scores
    # (0.7): 6 matches in 2 chunks, as METEOR 1.5 adds no chunk for a perfectly matched
    # segment: 1 - 0.6 * (2/6) ** 0.2.
    corpus = meteor.score([["dog cat"], ["a b c d"]], ["cat dog", "a b c d"])
    assert corpus == pytest.approx(1 - 0.6 * (2 / 6) ** 0.2, abs=1e-9)


def test_e2e_files_group_references_by_mr(shared_dir):
    mrs, refs = read_refs_csv(shared_dir / "data" / "e2e" / "testset_w_refs.csv")
    assert len(mrs) == len(refs) == 630
    assert sum(len(group) for group in refs) == 4693
    assert len(set(mrs)) == 630


def test_score_e2e_perfect_output_without_java():
    refs = [["the cat sat on the mat"], ["a dog barks at the moon"]]
    got = score_e2e(refs, ["The cat sat on the mat", "a dog barks at the moon"],
                    metrics=["bleu", "NIST"])
    assert list(got) == ["BLEU", "NIST"]
    assert got["BLEU"] == pytest.approx(1.0, rel=1e-12)


def test_missing_java_names_the_metrics_and_the_way_out(monkeypatch):
    monkeypatch.setattr(coco.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match=r"METEOR, ROUGE_L, CIDEr need Java.*--metrics BLEU,NIST"):
        score_e2e([["a b"]], ["a b"])
    assert score_e2e([["a b"]], ["a b"], metrics=["BLEU", "NIST"])["BLEU"] > 0
    with pytest.raises(UserError, match="METEOR needs Java.*--metrics BLEU to"):
        score_bleu_meteor([["a b"]], ["a b"])


def test_score_bleu_meteor_bleu_is_sacrebleu_on_unit_scale():
    # Variable reference counts: the second segment has one reference only.
    got = score_bleu_meteor([["a b c d e", "x"], ["f g h i j"]], ["a b c d e", "f g h i j"],
                            metrics=["BLEU"])
    assert got == {"BLEU": pytest.approx(1.0)}


def test_check_metrics_rejects_unknown_names():
    assert check_metrics(["cider", "Rouge_L"]) == ["CIDEr", "ROUGE_L"]
    with pytest.raises(UserError, match="unknown metric.*BLEU4.*allowed: BLEU, NIST"):
        check_metrics(["BLEU4"])


# ---- file readers ----------------------------------------------------------------------


def test_read_refs_csv_groups_consecutive_mrs_and_fixes_encoding(tmp_path):
    path = tmp_path / "refs.csv"
    path.write_text('\ufeff"mr","ref"\r\n"m[1], n[2]","Costs Â£20."\r\n\r\n'
                    '"m[1], n[2]","Second, with a comma"\r\n"o[3]","Third"\r\n'
                    '"m[1], n[2]","Again"\r\n', encoding="utf-8")
    mrs, refs = read_refs_csv(path)
    assert mrs == ["m[1], n[2]", "o[3]", "m[1], n[2]"]
    assert refs == [["Costs £20.", "Second, with a comma"], ["Third"], ["Again"]]


def test_read_hyps_keeps_blank_lines_and_strips(tmp_path):
    path = tmp_path / "hyp.txt"
    path.write_text(" one \n\ntwo\n", encoding="utf-8")
    assert read_hyps(path) == ["one", "", "two"]


# ---- CLI -------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    refs = tmp_path / "refs.csv"
    refs.write_text("mr,ref\nm1,the cat sat down\nm1,a cat sat\nm2,the dog ran away\n",
                    encoding="utf-8")
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("The cat sat down\nthe dog ran away\n", encoding="utf-8")
    return refs, hyp, tmp_path


def run_cli(capsys, *argv):
    code = main(["score", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_one_json_object(files, capsys):
    refs, hyp, _ = files
    code, out, err = run_cli(capsys, "--refs", str(refs), "--hyp", str(hyp),
                             "--metrics", "BLEU,NIST")
    assert code == 0 and err == "" and out.count("\n") == 1
    scores = json.loads(out)
    assert list(scores) == ["BLEU", "NIST"]
    assert scores["BLEU"] == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("case, message", [
    ("mismatch", "has 3 lines but .* has 2 MRs"),
    ("empty", "hypothesis file .* is empty"),
    ("columns", "the header needs one `mr` column"),
    ("metric", "unknown metric.*'BLEU-4'"),
    ("missing", "references file not found"),
    ("java", "METEOR, ROUGE_L, CIDEr need Java"),
])
def test_cli_errors_are_one_line(files, capsys, monkeypatch, case, message):
    refs, hyp, tmp = files
    metrics = "BLEU"
    if case == "mismatch":
        hyp.write_text("a\nb\nc\n", encoding="utf-8")
    elif case == "empty":
        hyp.write_text("", encoding="utf-8")
    elif case == "columns":
        refs.write_text("input,output\nm1,x\n", encoding="utf-8")
    elif case == "metric":
        metrics = "BLEU-4"
    elif case == "missing":
        refs = tmp / "nope.csv"
    elif case == "java":
        monkeypatch.setattr(coco.shutil, "which", lambda name: None)
        metrics = "BLEU,METEOR,ROUGE_L,CIDEr"
    code, out, err = run_cli(capsys, "--refs", str(refs), "--hyp", str(hyp),
                             "--metrics", metrics)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_cli_module_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lora_repro.evaluate", "score", "--refs",
         str(tmp_path / "missing.csv"), "--hyp", str(tmp_path / "missing.txt")],
        capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
