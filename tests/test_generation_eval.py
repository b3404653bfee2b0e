"""WebNLG / DART scoring as the paper's official pipeline (gpt2_decode.py + GenerationEval).

Expected BLEU and TER values are counted by hand below; tokenizer examples follow the
official functions' code (``re.split('(\\W)', ...)`` after ``lower()``, then NLTK).
"""

import json
import math
import shutil
import subprocess

import pytest

from lora_repro.data.records import Example, group_by_source
from lora_repro.data.tasks import load_task
from lora_repro.errors import UserError
from lora_repro.evaluate import main
from lora_repro.metrics import coco
from lora_repro.metrics.generation_eval import (
    nltk_tokenize,
    official_references,
    post_process,
    score_generation_eval,
    segment_ter,
    split_parts,
    standard_tokenize,
)

NO_JAVA = ("BLEU", "TER")


def test_post_process_lowercases_then_splits_every_non_word_character():
    assert post_process("The Aarhus Airport's runway (2,776.0 m) is \"long\".") == (
        "the aarhus airport ' s runway ( 2 , 776 . 0 m ) is \" long \" .")
    assert standard_tokenize("  St._Louis--area  ") == "St . _Louis - - area"  # _ is a word char
    assert post_process("Ÿ Straße") == "ÿ straße"  # unicode word characters stay whole


def test_nltk_tokenize_on_post_processed_text():
    # NLTK turns every (now separate) double quote into `` and splits a few contractions.
    assert nltk_tokenize(post_process('He said "I cannot go".')) == (
        "he said `` i can not go `` .")


def test_nltk_tokenize_needs_no_sentence_splitter():
    """Punkt can only cut post-processed text at spaces; any such cut gives the same tokens."""
    text = post_process('It is "Mr. Smith". He cannot, e.g., gonna win... Yes!? (no) \'ok\'')
    words = text.split(" ")
    whole = nltk_tokenize(text).split()
    for cut in range(1, len(words)):
        parts = [" ".join(words[:cut]), " ".join(words[cut:])]
        assert [t for p in parts for t in nltk_tokenize(p).split()] == whole


def test_official_references_pad_with_the_first_and_keep_six():
    assert official_references(["a", "b"]) == ["a", "b", "a", "a", "a", "a"]
    assert official_references(list("abcdefgh")) == list("abcdef")


def test_bleu_hand_counted_lowercased_closest_length_tie_to_shorter():
    refs = [["the cat sat on a mat"], ["A dog barks.", "A dog"]]
    hyps = ["The cat sat on the mat", "a dog."]
    # Segment 1: 1-4-gram hits 5/6, 3/5, 2/4, 1/3; segment 2 ("a dog ."): 3/3, 1/2, 0/1, 0/0.
    # Reference lengths 6 + 2 (lengths 4 and 2 tie at distance 1: the shorter) = 8 < 9: BP 1.
    expected = (8 / 9 * 4 / 7 * 2 / 5 * 1 / 3) ** 0.25
    got = score_generation_eval(refs, hyps, metrics=["BLEU"])
    assert got == {"BLEU": pytest.approx(expected, rel=1e-12)}


def test_bleu_brevity_penalty_and_no_smoothing():
    # "a b c d" against "a b c d e f": all precisions 1, BP exp(1 - 6/4).
    got = score_generation_eval([["a b c d e f"]], ["a b c d"], metrics=["BLEU"])["BLEU"]
    assert got == pytest.approx(math.exp(1 - 6 / 4))
    # No 4-gram hit: multi-bleu-detok gives 0 (sacrebleu's default smoothing would not).
    assert score_generation_eval([["a b c d"]], ["a b c e"], metrics=["BLEU"])["BLEU"] == 0


def test_ter_hand_counted_min_over_references_mean_over_segments():
    ref = "SAUDI ARABIA denied THIS WEEK information published in the AMERICAN new york times"
    hyp = "THIS WEEK THE SAUDIS denied information published in the new york times"
    # 1 shift (this week), 2 substitutions, 1 deletion: 4 edits / 13 reference words.
    assert segment_ter(post_process(hyp), [post_process(ref)]) == pytest.approx(4 / 13)
    refs = [["the dog sat down", "the cat sat down"], [ref]]
    got = score_generation_eval(refs, ["the cat sat", hyp], metrics=["TER"])
    assert got == {"TER": pytest.approx((1 / 4 + 4 / 13) / 2)}  # one insertion / 4 words
    assert segment_ter("", ["a b"]) == 1.0 and segment_ter("a", [""]) == 1.0


def test_split_parts_filters_references_as_gpt2_decode_filter_does():
    refs = [["r1", "r2"], ["u1"], ["s1", "u2"]]
    seen = [(True, True), (False,), (True, False)]
    parts = split_parts(refs, seen)
    assert parts["_S"] == ([0, 2], [["r1", "r2"], ["s1"]])
    assert parts["_U"] == ([1, 2], [["u1"], ["u2"]])
    assert parts[""] == ([0, 1, 2], refs)
    assert set(split_parts(refs, [(True, True), (True,), (True, True)])) == {"", "_S"}


def test_parts_are_scored_on_their_own():
    refs = [["a b c d"], ["e f g h"], ["x y z w"]]
    hyps = ["a b c d", "e f g h", "q r s t"]
    got = score_generation_eval(refs, hyps, seen=[(True,), (True,), (False,)],
                                metrics=NO_JAVA)
    assert got["BLEU_S"] == pytest.approx(1.0) and got["TER_S"] == 0
    assert got["BLEU_U"] == 0 and got["TER_U"] == 1
    assert got["TER"] == pytest.approx(1 / 3)
    assert list(got) == ["BLEU", "TER", "BLEU_S", "TER_S", "BLEU_U", "TER_U"]


def test_mismatched_inputs_are_user_errors():
    with pytest.raises(UserError, match="2 hypotheses but 1 sources"):
        score_generation_eval([["a"]], ["a", "b"], metrics=NO_JAVA)
    with pytest.raises(UserError, match="one flag per reference"):
        score_generation_eval([["a", "b"]], ["a"], seen=[(True,)], metrics=NO_JAVA)
    with pytest.raises(UserError, match="unknown metric 'CIDEr'"):
        score_generation_eval([["a"]], ["a"], metrics=["CIDEr"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")
def test_meteor_equals_the_jar_in_eval_py_file_mode(tmp_path):
    """eval.py runs ``meteor-1.5.jar hyp ref -l en -norm -r 6`` on files; our one JVM sums the
    same segment statistics."""
    refs = [["The cat sat on the mat.", "A cat was sitting on a mat."],
            ["Nothing matches here"], ["Alan Bean was born in Wheeler, Texas."]]
    hyps = ["the cat is sitting on the mat", "", "Alan Bean's birthplace is Wheeler , Texas"]
    tok = [[nltk_tokenize(post_process(r)) for r in official_references(g)] for g in refs]
    (tmp_path / "hyp").write_text("\n".join(nltk_tokenize(post_process(h)) for h in hyps))
    (tmp_path / "ref").write_text("\n".join(r for g in tok for r in g))
    cmd = ["java", "-Xmx2G", "-jar", str(coco.METEOR_JAR), str(tmp_path / "hyp"),
           str(tmp_path / "ref"), "-l", "en", "-norm", "-r", "6"]
    out = subprocess.run(cmd, capture_output=True, check=True, text=True).stdout
    assert out.strip().split("\n")[-1].startswith("Final score:")
    got = score_generation_eval(refs, hyps, seen=[(True, False), (False,), (True,)],
                                metrics=["METEOR"])
    assert got["METEOR"] == pytest.approx(float(out.split()[-1]), abs=1e-12)
    assert 0 < got["METEOR_U"] < got["METEOR"] < got["METEOR_S"] < 1


def test_webnlg_dev_seen_unseen_counts(shared_dir, tmp_path):
    """Seen = a training category: train on dev.json without Food, test on dev.json."""
    dev = json.loads((shared_dir / "data/webnlg/dev.json").read_text())
    entries = [next(iter(item.values())) for item in dev["entries"]]
    (tmp_path / "train.json").write_text(json.dumps({"entries": [
        {str(i + 1): e} for i, e in enumerate(x for x in entries if x["category"] != "Food")]}))
    (tmp_path / "dev.json").write_text(json.dumps(dev))
    test = load_task("webnlg", data_dir=str(tmp_path), valid_file=None, test_file="dev.json").test

    def distinct(keep) -> int:  # distinct sources with a good lexicalisation, from the raw json
        return len({json.dumps(e["modifiedtripleset"]) for e in entries
                    if keep(e) and any(x["comment"] == "good" for x in e["lexicalisations"])})

    parts = split_parts([list(t.references) for t in test], [t.seen for t in test])
    assert len(test) == distinct(lambda e: True) == 870
    assert len(parts["_U"][0]) == distinct(lambda e: e["category"] == "Food") == 178
    assert len(parts["_S"][0]) == distinct(lambda e: e["category"] != "Food") == 693
    # One source is in both Building (seen) and Food (unseen): in both parts, split references.
    assert sum(len(g) for g in parts["_S"][1]) + sum(len(g) for g in parts["_U"][1]) == sum(
        len(t.references) for t in test)
    all_seen = load_task("webnlg", data_dir=str(shared_dir / "data/webnlg"),
                         train_file="dev.json", valid_file=None, test_file="dev.json").test
    assert all(all(t.seen) for t in all_seen)


def test_group_by_source_marks_each_reference():
    examples = [Example("s", "x", "Food"), Example("t", "y", "City"), Example("s", "z", "Art")]
    got = group_by_source(examples, {"Food", "City"})
    assert [(t.references, t.seen) for t in got] == [(("x", "z"), (True, False)),
                                                     (("y",), (True,))]
    assert group_by_source(examples)[0].seen is None


def _webnlg_json(entries) -> dict:
    return {"entries": [{str(i + 1): {
        "category": cat, "modifiedtripleset": [{"subject": s, "property": "p", "object": "o"}],
        "lexicalisations": [{"comment": "good", "lex": lex} for lex in lexes]}}
        for i, (cat, s, lexes) in enumerate(entries)]}


def test_cli_webnlg_seen_unseen_from_train_beside_refs(tmp_path, capsys):
    (tmp_path / "train.json").write_text(json.dumps(_webnlg_json([("Airport", "A", ["x"])])))
    (tmp_path / "test.json").write_text(json.dumps(_webnlg_json([
        ("Airport", "B", ["B is an airport .", "An airport : B ."]),
        ("Artist", "C", ["C paints pictures ."])])))
    (tmp_path / "hyp.txt").write_text("B is an airport.\nC paints.\n")
    args = ["score", "--task", "webnlg", "--refs", str(tmp_path / "test.json"),
            "--hyp", str(tmp_path / "hyp.txt"), "--metrics", "BLEU,TER"]
    assert main(args) == 0
    got = json.loads(capsys.readouterr().out)
    # "c paints ." (3 words, no 4-gram) against "c paints pictures .": 1 insertion / 4 words.
    # Both: hits 8/8, 5/6, 3/4, 2/2; reference length 5 + 4 > 8 words.
    bleu = math.exp(1 - 9 / 8) * (5 / 6 * 3 / 4) ** 0.25
    assert got == {"BLEU": pytest.approx(bleu), "TER": 0.125, "BLEU_S": pytest.approx(1.0),
                   "TER_S": 0.0, "BLEU_U": 0.0, "TER_U": 0.25}
    (tmp_path / "train.json").unlink()
    assert main(args) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"BLEU", "TER"}


def test_cli_dart_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "test.json").write_text(json.dumps(
        [{"tripleset": [["a", "R", "b"]], "annotations": [{"text": "a r b"}]}]))
    (tmp_path / "hyp.txt").write_text("a r b\nextra\n")
    assert main(["score", "--task", "dart", "--refs", str(tmp_path / "test.json"),
                 "--hyp", str(tmp_path / "hyp.txt"), "--metrics", "TER"]) == 2
    assert "has 2 lines but" in capsys.readouterr().err
    (tmp_path / "hyp.txt").write_text("a r b\n")
    assert main(["score", "--task", "dart", "--refs", str(tmp_path / "test.json"),
                 "--hyp", str(tmp_path / "hyp.txt"), "--metrics", "BLEU,TER"]) == 0
    assert json.loads(capsys.readouterr().out) == {"BLEU": 0.0, "TER": 0.0}


def _web_summary(seed, task="webnlg", **metrics):
    return {"config": {"model": "gpt2-medium", "task": task, "targets": "qv", "rank": 4,
                       "seed": seed}, "metrics": metrics, "trainable_params": 350_208}


def test_table13_seen_unseen_all_and_table14():
    from analysis import tables as T

    parts = {"BLEU_S": 0.62, "BLEU_U": 0.45, "BLEU": 0.55, "METEOR_S": 0.44, "METEOR_U": 0.38,
             "METEOR": 0.41, "TER_S": 0.35, "TER_U": 0.53, "TER": 0.43}
    runs = [_web_summary(1, **parts), _web_summary(2, **(parts | {"BLEU_U": 0.47}))]
    table = T.table13(runs)
    row = table.iloc[0]
    assert row["BLEU U"] == "46.0±1.4"  # mean 46.0, sample std 1.41 (x100)
    assert (row["BLEU S"], row["BLEU A"]) == ("62.0±.0", "55.0±.0")
    assert (row["MET S"], row["TER U"], row["TER A"]) == ("0.44±.00", "0.53±.00", "0.43±.00")
    assert row["# Trainable Parameters"] == "0.35M"
    dart = T.table14([_web_summary(1, "dart", BLEU=0.47, METEOR=0.39, TER=0.46)])
    assert list(dart.iloc[0]) == ["0.35M", "47.0", "0.39", "0.46"]
