"""`task.references=paper|original`: E2E text tokenized as the LoRA code's official files."""

import csv
import hashlib
import json
import re
from dataclasses import asdict, replace

import pytest

from analysis import tables as T
from lora_repro import run_reader, rundir
from lora_repro.config import TaskConfig, TrainConfig, validate
from lora_repro.data import load_task
from lora_repro.data.e2e import e2e_example
from lora_repro.data.hub import e2e_row
from lora_repro.data.references import text_transform, tokenize_test, tokenize_train
from lora_repro.errors import UserError
from lora_repro.evaluate import main

# (MR, reference) of the official CSV -> the line of microsoft/LoRA examples/NLG/data/e2e/*.txt,
# copied from those files (test vectors: line numbers of testset_w_refs.csv / devset.csv rows).
TEST_TXT = [  # test.txt (spaCy, 2.0 infix rules)
    ("name[Blue Spice], eatType[pub], food[Chinese], area[city centre], familyFriendly[yes], "
     "near[Rainbow Vegetarian Café]",
     "For Chinese, head to Blue Spice. It's a family friendly pub located in the City Centre "
     "near the Rainbow Vegetarian Café.",
     "name : Blue Spice | Type : pub | food : Chinese | area : city centre | family friendly : "
     "yes | near : Rainbow Vegetarian Café||For Chinese , head to Blue Spice . It 's a family "
     "friendly pub located in the City Centre near the Rainbow Vegetarian Café ."),
    ("name[Giraffe], eatType[pub], food[French], area[riverside], familyFriendly[no], "
     "near[Raja Indian Cuisine]",
     "If you're looking for somewhere that isn't family-friendly, riverside has Giraffe, a "
     "French pub near the Raja Indian Cuisine.",
     "name : Giraffe | Type : pub | food : French | area : riverside | family friendly : no | "
     "near : Raja Indian Cuisine||If you 're looking for somewhere that is n't family - "
     "friendly , riverside has Giraffe , a French pub near the Raja Indian Cuisine ."),
    ("name[Green Man], eatType[pub], customer rating[1 out of 5], near[All Bar One]",
     "The Green Man pub received a rating of 1 out of 5.  it is located near All Bar One.",
     "name : Green Man | Type : pub | customer rating : 1 out of 5 | near : All Bar One||The "
     "Green Man pub received a rating of 1 out of 5 . it is located near All Bar One ."),
    ("name[Green Man], eatType[pub], food[Italian], area[riverside], familyFriendly[yes], "
     "near[Raja Indian Cuisine]",
     "Have you visited Green Man? Its a children friendly Italian pub near Raja Indian Cuisine "
     "located by the riverside.",
     "name : Green Man | Type : pub | food : Italian | area : riverside | family friendly : yes "
     "| near : Raja Indian Cuisine||Have you visited Green Man ? Its a children friendly "
     "Italian pub near Raja Indian Cuisine located by the riverside ."),
    ("name[The Cricketers], eatType[restaurant], food[Chinese], priceRange[more than £30], "
     "customer rating[high], area[riverside], familyFriendly[yes], near[All Bar One]",
     "The Cricketers restaurant, serving Chinese food, prices from £30.99, high profile, "
     "riverside, near All Bar One, child friendly",
     "name : The Cricketers | Type : restaurant | food : Chinese | price : more than £ 30 | "
     "customer rating : high | area : riverside | family friendly : yes | near : All Bar One||"
     "The Cricketers restaurant , serving Chinese food , prices from £ 30.99 , high profile , "
     "riverside , near All Bar One , child friendly"),
    ("name[The Cricketers], eatType[restaurant], food[English], priceRange[£20-25], "
     "customer rating[high], area[city centre], familyFriendly[no], near[All Bar One]",
     "The Cricketers is an English restaurant near All Bar One in the city centre with a  "
     "price Range £20-25 and is not kid friendly.",
     "name : The Cricketers | Type : restaurant | food : English | price : £ 20 - 25 | "
     "customer rating : high | area : city centre | family friendly : no | near : All Bar One||"
     "The Cricketers is an English restaurant near All Bar One in the city centre with a price "
     "Range £ 20 - 25 and is not kid friendly ."),
    ("name[The Mill], eatType[pub], food[Fast food], priceRange[£20-25], customer rating[high], "
     "area[city centre], familyFriendly[yes], near[Café Rouge]",
     "The Mill is a pub that also offers reasonably priced fast food around E20-E25. They are "
     "located in the city center near Café Rouge. Last year, they received high customer "
     "ratings and have been found very kid friendly.",
     "name : The Mill | Type : pub | food : Fast food | price : £ 20 - 25 | customer rating : "
     "high | area : city centre | family friendly : yes | near : Café Rouge||The Mill is a pub "
     "that also offers reasonably priced fast food around E20-E25 . They are located in the "
     "city center near Café Rouge . Last year , they received high customer ratings and have "
     "been found very kid friendly ."),
    ("name[The Mill], eatType[pub], food[Fast food], priceRange[cheap], customer rating[5 out "
     "of 5], area[riverside], familyFriendly[yes], near[Café Sicilia]",
     "The Mill is a low-cost, fast food, 5-star, pub located near the Café Sicilia by the river.",
     "name : The Mill | Type : pub | food : Fast food | price : cheap | customer rating : 5 out "
     "of 5 | area : riverside | family friendly : yes | near : Café Sicilia||The Mill is a low "
     "- cost , fast food , 5-star , pub located near the Café Sicilia by the river ."),
    # The official line has ~300 spaces before ";" (an artifact of all 13 such lines), kept
    # out here: the tokenized text equals the official one with whitespace collapsed.
    ("name[The Mill], eatType[pub], food[Fast food], priceRange[less than £20], "
     "customer rating[low], area[riverside], familyFriendly[no], near[Café Sicilia]",
     "Fast food pub called The Mill in riverside area near Café Sicilia; not family-friendly, "
     "low cost and low customer rating.",
     "name : The Mill | Type : pub | food : Fast food | price : less than £ 20 | customer "
     "rating : low | area : riverside | family friendly : no | near : Café Sicilia||Fast food "
     "pub called The Mill in riverside area near Café Sicilia ; not family - friendly , low "
     "cost and low customer rating ."),
    ("name[The Mill], eatType[pub], food[Fast food], priceRange[moderate], customer rating[1 "
     "out of 5], area[city centre], familyFriendly[yes], near[Café Sicilia]",
     "The Mill is a pub, and moderately priced, next to Café Sicilia at City centre.  Rating: "
     "1 out of 5.   Kid friendly.",
     "name : The Mill | Type : pub | food : Fast food | price : moderate | customer rating : 1 "
     "out of 5 | area : city centre | family friendly : yes | near : Café Sicilia||The Mill is "
     "a pub , and moderately priced , next to Café Sicilia at City centre . Rating : 1 out of "
     "5 . Kid friendly ."),
    ("name[The Phoenix], eatType[pub], food[French], priceRange[£20-25], area[riverside], "
     "familyFriendly[yes], near[Raja Indian Cuisine]",
     "The Phoenix is a pub located near Raja Indian Cuisine. They are kids friendly and cost "
     "between £20-£25. They serve French food.",
     "name : The Phoenix | Type : pub | food : French | price : £ 20 - 25 | area : riverside | "
     "family friendly : yes | near : Raja Indian Cuisine||The Phoenix is a pub located near "
     "Raja Indian Cuisine . They are kids friendly and cost between £ 20-£25 . They serve "
     "French food ."),
]
VALID_TXT = [  # valid.txt (as train.txt: Moses, aggressive dash splits)
    ("name[Alimentum], area[riverside], familyFriendly[no]",
     "Alimentum looks like a location where people or families aren't allowed",
     "name : Alimentum | area : riverside | family friendly : no||Alimentum looks like a "
     "location where people or families aren 't allowed"),
    ("name[Clowns], eatType[coffee shop], food[English], customer rating[low], area[riverside], "
     "near[Clare Hall]",
     "Located next to Clare Hall is Clowns, a 1-star coffee shop on the river, serving "
     "breakfast to its customers.",
     "name : Clowns | Type : coffee shop | food : English | customer rating : low | area : "
     "riverside | near : Clare Hall||Located next to Clare Hall is Clowns , a 1 - star coffee "
     "shop on the river , serving breakfast to its customers ."),
    ("name[Cocum], eatType[coffee shop], food[English], priceRange[£20-25], customer "
     "rating[high], familyFriendly[no]",
     "Cocum is an English coffee shop that is highly rated by customers. It is has an average "
     "price range of £20-£25 and it is not kids-friendly.",
     "name : Cocum | Type : coffee shop | food : English | price : £ 20 - 25 | customer rating "
     ": high | family friendly : no||Cocum is an English coffee shop that is highly rated by "
     "customers . It is has an average price range of £ 20- £ 25 and it is not kids - "
     "friendly ."),
    ("name[The Mill], eatType[coffee shop], food[Chinese], priceRange[more than £30], "
     "area[riverside], near[The Sorrento]",
     "near The Sorrento there is a Chinese coffee shop called The Mill that is expensive: more "
     "than £30. located on the riverside you can enjoy a cup of coffee while looking onto a "
     "beautiful landscape.",
     "name : The Mill | Type : coffee shop | food : Chinese | price : more than £ 30 | area : "
     "riverside | near : The Sorrento||near The Sorrento there is a Chinese coffee shop called "
     "The Mill that is expensive : more than £ 30 . located on the riverside you can enjoy a "
     "cup of coffee while looking onto a beautiful landscape ."),
]
# sha256 of the official test.txt's 4,693 references (whitespace collapsed), one per line, and
# of its 4,693 linearized MRs: the whole file, without shipping it.
TEST_REFS_SHA256 = "ed731205b3af14c287a23d8bc526a3bbf6fb494042372b25857a7846b145eb66"
TEST_MRS_SHA256 = "b8c789620036de2f2f4ea22529d4571240eaa594d4aef89df5b0d7ec8363d30c"


@pytest.mark.parametrize("split,vectors", [("test", TEST_TXT), ("valid", VALID_TXT),
                                           ("train", VALID_TXT)])
def test_paper_text_equals_the_official_lines(split, vectors):
    prepare = text_transform("paper", split)
    for mr, ref, official in vectors:
        ex = e2e_example(mr, ref, prepare)
        assert f"{ex.source}||{ex.target}" == official
    assert text_transform("original", split) is None


def test_the_two_tokenizers_differ_where_the_official_files_do():
    assert tokenize_test("It isn't a 5-star place.") == "It is n't a 5-star place ."
    assert tokenize_train("It isn't a 5-star place.") == "It isn 't a 5 - star place ."


def _sha(lines):
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_whole_test_file_equals_the_official_one(shared_dir):
    path = shared_dir / "data" / "e2e" / "testset_w_refs.csv"
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    examples = [e2e_example(r["mr"], r["ref"].strip(), tokenize_test) for r in rows]
    assert _sha(ex.target for ex in examples) == TEST_REFS_SHA256
    assert _sha(ex.source for ex in examples) == TEST_MRS_SHA256


def test_readers_apply_the_option_to_every_split(tmp_path):
    rows = [(mr, ref) for mr, ref, _ in TEST_TXT[:3]]
    with open(tmp_path / "t.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("mr", "ref"), *rows])
    files = {"train_file": "t.csv", "valid_file": "t.csv", "test_file": "t.csv"}
    paper = load_task("e2e", data_dir=str(tmp_path), **files)
    original = load_task("e2e", data_dir=str(tmp_path), references="original", **files)
    assert [ex.target for ex in original.train] == [ref for _, ref in rows]
    assert paper.test[0].references[0] == TEST_TXT[0][2].split("||")[1]
    assert paper.train[1].target == tokenize_train(rows[1][1]) != tokenize_test(rows[1][1])
    row = {"meaning_representation": TEST_TXT[5][0], "human_reference": TEST_TXT[5][1]}
    [hub_ex] = e2e_row(row, text_transform("paper", "test"))
    assert f"{hub_ex.source}||{hub_ex.target}" == TEST_TXT[5][2]


def test_the_option_is_validated_in_one_line(tmp_path):
    cfg = TrainConfig()
    assert cfg.task.references == "paper"
    for task, value, match in (("e2e", "tokenized", "allowed values are ('paper', 'original')"),
                               ("webnlg", "original", "task webnlg allows only paper")):
        bad = replace(cfg, task=replace(TaskConfig(), name=task, references=value))
        with pytest.raises(UserError, match=re.escape(match)) as err:
            validate(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="task.references='x'"):
        load_task("e2e", data_dir=str(tmp_path), references="x")


def test_runs_made_before_the_option_read_as_original(tmp_path):
    config = asdict(TrainConfig())
    del config["task"]["references"]
    (tmp_path / "run_config.json").write_text(json.dumps(config))
    assert run_reader.run_config(tmp_path).task.references == "original"
    assert rundir.flat_identity(config)["task.references"] == "original"
    old = rundir.identity(TrainConfig())
    del old["task"]["references"]
    rundir.check_same_run(tmp_path, old, replace(TrainConfig(), task=replace(
        TaskConfig(), references="original")))  # resumes with the references it trained on
    with pytest.raises(UserError, match="task.references: 'original' -> 'paper'"):
        rundir.check_same_run(tmp_path, old, TrainConfig())
    config["task"] |= {"name": "webnlg"}  # its only text, whatever the run's age
    (tmp_path / "run_config.json").write_text(json.dumps(config))
    assert run_reader.run_config(tmp_path).task.references == "paper"


def test_score_either_way(tmp_path, capsys):
    refs = tmp_path / "refs.csv"
    with open(refs, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("mr", "ref"), *((mr, ref) for mr, ref, _ in TEST_TXT[:4])])
    hyp = tmp_path / "hyp.txt"  # outputs written as the paper's model writes: tokenized
    hyp.write_text("\n".join(line.split("||")[1] for _, _, line in TEST_TXT[:4]) + "\n")
    scores = {}
    for how in ("paper", "original"):
        args = ["score", "--refs", str(refs), "--hyp", str(hyp), "--metrics", "BLEU"]
        assert main([*args, "--references", how]) == 0
        scores[how] = json.loads(capsys.readouterr().out)["BLEU"]
    assert scores["paper"] == pytest.approx(1.0) and scores["original"] < 0.9
    assert main(["score", "--refs", str(refs), "--hyp", str(hyp), "--references", "x"]) == 2
    assert "task.references='x'" in capsys.readouterr().err


def test_tables_keep_paper_and_original_runs_apart():
    def summary(seed, references, bleu):
        task = {"name": "e2e", "references": references}
        return {"config": {"model": "gpt2-medium", "task": task, "targets": "qv", "rank": 4,
                           "seed": seed}, "metrics": {"BLEU": bleu}, "trainable_params": 1}

    runs_ = T.runs_frame([summary(1, "paper", 0.70), summary(2, "paper", 0.72),
                          summary(1, "original", 0.66)])
    table = T.aggregate(runs_, ["BLEU"])
    assert len(table) == 2
    paper = table.loc[("gpt2-medium", "e2e", "lora", "qv", 4, "task.references=paper")]
    assert paper[("BLEU", "mean")] == pytest.approx(0.71) and paper[("BLEU", "n")] == 2


def test_score_run_uses_the_runs_references(tmp_path, capsys):
    rows = [(mr, ref) for mr, ref, _ in TEST_TXT[:3]]
    with open(tmp_path / "t.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("mr", "ref"), *rows])
    task = replace(TaskConfig(), data_dir=str(tmp_path), train_file="t.csv", valid_file=None,
                   test_file="t.csv")
    summary = {"config": asdict(replace(TrainConfig(), task=task)), "metrics": {}}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "predictions.txt").write_text(  # the tokenized references: paper BLEU 1
        "\n".join(line.split("||")[1] for _, _, line in TEST_TXT[:3]) + "\n")
    assert main(["score", f"run={run_dir}"]) == 0
    paper = json.loads(capsys.readouterr().out)
    assert paper["BLEU"] == pytest.approx(1.0)
    assert json.loads((run_dir / "summary.json").read_text())["metrics"] == paper
    assert main(["score", f"run={run_dir}", "task.references=original"]) == 0
    assert json.loads(capsys.readouterr().out)["BLEU"] < 0.9
    assert json.loads((run_dir / "summary.json").read_text())["metrics"] == paper  # kept
