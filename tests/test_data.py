"""Tasks, prompt encoding and batching (lora_repro.data)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import ByT5Tokenizer

from lora_repro.data import (
    IGNORE_INDEX,
    OFFLINE_E2E,
    Example,
    bucket_length,
    collate,
    encode_dataset,
    encode_example,
    encode_prompts,
    length_grouped_batches,
    load_task,
    prompt_text,
)
from lora_repro.data.e2e import linearize_mr
from lora_repro.data.encoding import join_and_truncate
from lora_repro.data.synthetic import SLOT_VALUES, synthetic_task
from lora_repro.data.tasks import split_by_source
from lora_repro.errors import UserError

ROWS = [  # MR A's references are not consecutive: grouping must still pool them
    ("name[Alpha], food[French]", "Alpha serves French food."),
    ("name[Beta], area[riverside]", "Beta is by the river."),
    ("name[Alpha], food[French]", "French food at Alpha."),
    ("name[Gamma], familyFriendly[yes]", "Gamma welcomes kids."),
    ("name[Beta], area[riverside]", "Riverside Beta."),
]


def write_csv(path, rows, header=("mr", "ref")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def byt5():
    return ByT5Tokenizer()


@pytest.fixture
def gpt2(shared_dir):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(shared_dir / "gpt2-tokenizer"))


# ---- tasks -----------------------------------------------------------------------------

def test_e2e_test_split_groups_refs_in_order_of_first_appearance(tmp_path):
    write_csv(tmp_path / "t.csv", ROWS)
    data = load_task("e2e", data_dir=str(tmp_path), train_file="t.csv", valid_file=None,
                     test_file="t.csv", references="original")
    assert [t.source for t in data.test] == [
        "name : Alpha | food : French", "name : Beta | area : riverside",
        "name : Gamma | family friendly : yes",
    ]
    assert data.test[0].references == ("Alpha serves French food.", "French food at Alpha.")
    assert data.test[1].references == ("Beta is by the river.", "Riverside Beta.")
    assert [ex.target for ex in data.train] == [r for _, r in ROWS]
    assert data.valid == []


def test_linearize_mr_renames_slots_like_the_lora_data():
    mr = "name[The Eagle], eatType[pub], priceRange[£20-25], customer rating[high], near[X]"
    assert linearize_mr(mr) == (
        "name : The Eagle | Type : pub | price : £20-25 | customer rating : high | near : X")


def test_split_by_source_is_disjoint_complete_and_deterministic():
    examples = [Example(f"src {i % 40}", f"ref {i}") for i in range(200)]
    train, valid = split_by_source(examples, 0.25, seed=3)
    train_src, valid_src = {e.source for e in train}, {e.source for e in valid}
    assert not train_src & valid_src
    assert len(valid_src) == 10 and len(train) + len(valid) == 200
    assert sorted(train + valid, key=examples.index) == examples  # order kept, nothing lost
    assert split_by_source(examples, 0.25, seed=3) == (train, valid)
    assert {e.source for e in split_by_source(examples, 0.25, seed=4)[1]} != valid_src


def test_max_examples_subsets_are_seeded_and_ordered():
    full = load_task("synthetic", n_train=50, refs_per_source=2)
    small = load_task("synthetic", n_train=50, refs_per_source=2, max_train_examples=30,
                      max_test_sources=7)
    assert len(small.train) == 30 and len(small.test) == 7
    idx = [full.train.index(ex) for ex in small.train]
    assert idx == sorted(idx)
    assert small == load_task("synthetic", n_train=50, refs_per_source=2,
                              max_train_examples=30, max_test_sources=7)


def test_synthetic_is_deterministic_disjoint_and_covers_every_slot_value():
    data = synthetic_task(n_train=300, n_valid=30, n_test=30, refs_per_source=3, seed=0)
    assert data == synthetic_task(n_train=300, n_valid=30, n_test=30, refs_per_source=3, seed=0)
    assert data.train != synthetic_task(n_train=300, n_valid=30, n_test=30, seed=1).train
    assert len(data.train) == 900 and len(data.valid) == 90 and len(data.test) == 30
    splits = [{e.source for e in data.train}, {e.source for e in data.valid},
              {t.source for t in data.test}]
    assert sum(map(len, splits)) == len(set.union(*splits)) == 360
    text = " | ".join(splits[0])
    for values in SLOT_VALUES.values():
        for value in values:
            assert f": {value}" in text, value
    # test split does not move when the train size changes
    assert synthetic_task(n_train=10, n_valid=30, n_test=30, seed=0).test == data.test


def test_synthetic_references_are_distinct_and_copy_every_value():
    data = synthetic_task(n_train=1, n_valid=0, n_test=100, refs_per_source=3)
    for item in data.test:
        assert len(set(item.references)) == 3
        values = [part.split(" : ", 1)[1] for part in item.source.split(" | ")]
        for ref in item.references:
            for value in values:
                if value not in ("yes", "no"):
                    assert value in ref, (value, ref)
            family = "family friendly : " in item.source
            assert family == any(w in ref for w in ("friendly", "Children"))


def test_shared_e2e_counts_and_offline_preset(shared_dir):
    e2e = str(shared_dir / "data" / "e2e")
    dev = load_task("e2e", data_dir=e2e, train_file="devset.csv", valid_file=None,
                    test_file="devset.csv")
    assert len(dev.test) == 547 and sum(len(t.references) for t in dev.test) == 4672
    assert len(dev.train) == 4672
    data = load_task("e2e", data_dir=e2e, seed=0, **OFFLINE_E2E)
    assert len(data.test) == 630 and sum(len(t.references) for t in data.test) == 4693
    train_src, valid_src = {e.source for e in data.train}, {e.source for e in data.valid}
    assert not train_src & valid_src and len(train_src | valid_src) == 547
    assert len(valid_src) == round(0.1 * 547)
    assert len(data.train) + len(data.valid) == 4672


def test_shared_webnlg_and_dart_counts(shared_dir):
    path = shared_dir / "data" / "webnlg" / "dev.json"
    entries = [next(iter(e.values())) for e in json.loads(path.read_text())["entries"]]
    good = sum(lex["comment"] == "good" for e in entries for lex in e["lexicalisations"])
    web = load_task("webnlg", data_dir=str(path.parent), train_file="dev.json",
                    valid_file=None, test_file="dev.json")
    assert len(entries) == 872 and len(web.train) == good
    assert sum(len(t.references) for t in web.test) == good
    assert web.test[0].source == "Aarhus : leaderName : Jacob_Bundsgaard"
    assert web.test[0].category == "Airport"

    path = shared_dir / "data" / "dart" / "dart-v1.1.1-full-dev.json"
    items = json.loads(path.read_text())
    dart = load_task("dart", data_dir=str(path.parent), train_file=path.name,
                     valid_file=None, test_file=path.name)
    assert len(items) == 2768
    assert len(dart.train) == sum(len(it["annotations"]) for it in items)
    assert sum(len(t.references) for t in dart.test) == len(dart.train)
    assert len(dart.test) == len({t.source for t in dart.test}) < len(items)  # duplicates pooled
    assert dart.train[0].source.startswith("Mars Hill College : joined : 1973 | ")


# ---- errors ----------------------------------------------------------------------------

def error_line(**kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_task(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_error_lines_name_the_key_and_what_is_allowed(tmp_path):
    assert "allowed: dart, e2e, synthetic, webnlg" in error_line(name="e2e_nlg")
    assert "task.foo" in error_line(name="e2e", foo=1)
    assert "task.valid_fraction" in error_line(name="e2e", data_dir=str(tmp_path),
                                               valid_fraction=1.5)
    assert "task.max_train_examples" in error_line(name="synthetic", max_train_examples=0)
    assert "task.data_dir" in error_line(name="e2e", data_dir=str(tmp_path / "nope"))
    message = error_line(name="e2e", data_dir=str(tmp_path))
    assert "task.train_file" in message and "trainset.csv" in message
    write_csv(tmp_path / "mr_only.csv", [("name[A]",)], header=("MR",))
    message = error_line(name="e2e", data_dir=str(tmp_path), train_file="mr_only.csv",
                         valid_file=None, test_file=None)
    assert "'mr' and 'ref'" in message and "mr_only.csv" in message
    message = error_line(name="e2e", data_dir=str(tmp_path), valid_fraction=0.1)
    assert "task.valid_file=null" in message
    assert "task.data_dir" in error_line(name="synthetic", data_dir=str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    assert "bad.json" in error_line(name="dart", data_dir=str(tmp_path), train_file="bad.json",
                                    valid_file=None, test_file=None)


def test_hub_failure_is_one_line_pointing_at_local_files(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'tuetschek/e2e_nlg' on the Hub (offline)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = error_line(name="e2e")
    assert "tuetschek/e2e_nlg" in message and "task.data_dir=" in message
    assert "trainset.csv" in message
    assert "has no hub equivalent" in error_line(name="dart", train_file="mine.json")


def test_hub_offline_env_gives_the_user_error_without_traceback(tmp_path):
    code = ("from lora_repro.data import load_task\n"
            "from lora_repro.errors import UserError\n"
            "try:\n    load_task('webnlg')\n"
            "except UserError as e:\n    print('USERERROR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.startswith("USERERROR cannot load task webnlg"), out.stdout + out.stderr
    assert "task.data_dir=" in out.stdout


# ---- encoding --------------------------------------------------------------------------

def test_labels_mask_exactly_the_prompt_byt5(byt5):
    ex = Example("name : Alpha | food : French", "Alpha serves French food.")
    enc = encode_example(byt5, ex, max_length=512)  # official: source, eos, " " + target, eos
    n_prompt = len(ex.source.encode()) + 1  # ByT5: one id per byte, then eos
    assert enc["input_ids"][n_prompt - 1] == byt5.eos_token_id == 1
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert enc["input_ids"][-1] == 1 and enc["input_ids"].count(1) == 2
    assert byt5.decode(enc["input_ids"][:n_prompt - 1]) == ex.source
    assert byt5.decode(enc["input_ids"][n_prompt:-1]) == " Alpha serves French food."
    text = encode_example(byt5, ex, max_length=512, prompt_format="text")
    assert text["input_ids"].count(1) == 1  # no extra eos from add_special_tokens
    assert byt5.decode(text["input_ids"][:-1]) == (
        "name : Alpha | food : French || Alpha serves French food.")


def test_labels_mask_exactly_the_prompt_gpt2(gpt2):
    ex = Example("name : Alpha | food : French", "Alpha serves French food.")
    for fmt, prompt in [("official", gpt2("name : Alpha | food : French")["input_ids"] + [50256]),
                        ("text", gpt2("name : Alpha | food : French ||")["input_ids"])]:
        enc = encode_example(gpt2, ex, max_length=512, prompt_format=fmt)
        assert enc["input_ids"][: len(prompt)] == prompt
        assert enc["labels"] == [IGNORE_INDEX] * len(prompt) + enc["input_ids"][len(prompt):]
        assert enc["input_ids"][-1] == 50256


def test_e2e_ids_equal_the_official_encoding(gpt2, shared_dir):
    """The first E2E test MR and reference, encoded as microsoft/LoRA's `create_datasets.sh`
    does (`gpt2_encode.py --add_bos --add_eos`: `enc.encode(context) + [50256]`, then
    `enc.encode(' ' + completion) + [50256]`). The expected ids come from running the official
    `encoder.py` with the official `vocab/` files on the context
    "name : Blue Spice | Type : coffee shop | area : city centre" and the official test.txt's
    reference (tokenized: task.references=paper, the default; " ." is id 764)."""
    official_context = [3672, 1058, 4518, 43537, 930, 5994, 1058, 6891, 6128, 930, 1989, 1058,
                        1748, 7372, 50256]
    official_completion = [317, 6891, 6128, 287, 262, 1748, 7372, 1989, 1444, 4518, 43537, 764,
                           50256]
    test = load_task("e2e", data_dir=str(shared_dir / "data" / "e2e"), train_file="devset.csv",
                     valid_file=None).test
    first = test[0]
    assert first.references[0] == "A coffee shop in the city centre area called Blue Spice ."
    assert encode_prompts(gpt2, [first.source], max_length=512) == [official_context]
    enc = encode_example(gpt2, Example(first.source, first.references[0]), max_length=512)
    assert enc["input_ids"] == official_context + official_completion
    assert enc["labels"] == [IGNORE_INDEX] * len(official_context) + official_completion


def test_gpt2_partwise_tokenization_equals_whole(gpt2, shared_dir):
    """prompt_format=text: the prompt and the target tokenized apart equal the whole string."""
    data = shared_dir / "data"
    examples = [
        *load_task("e2e", data_dir=str(data / "e2e"), train_file="devset.csv", valid_file=None,
                   test_file=None).train,
        *load_task("webnlg", data_dir=str(data / "webnlg"), train_file="dev.json",
                   valid_file=None, test_file=None).train,
        *load_task("dart", data_dir=str(data / "dart"), train_file="dart-v1.1.1-full-dev.json",
                   valid_file=None, test_file=None).train,
        *synthetic_task(n_train=300, seed=0).train,
    ]
    whole = gpt2([f"{prompt_text(e.source, 'text')} {e.target}" for e in examples],
                 add_special_tokens=False)["input_ids"]
    parts = encode_dataset(gpt2, examples, max_length=10_000, prompt_format="text")
    mismatches = [e for e, w, p in zip(examples, whole, parts, strict=True)
                  if p["input_ids"] != w + [gpt2.eos_token_id]]
    assert len(examples) > 14_000 and not mismatches, mismatches[:3]


def test_encode_dataset_matches_encode_example(byt5):
    examples = synthetic_task(n_train=20, refs_per_source=2).train
    assert encode_dataset(byt5, examples, 128) == [encode_example(byt5, e, 128) for e in examples]


def test_truncation_keeps_the_prompt_and_cuts_the_target():
    prompt, target = [5, 6, 7, 8], [9, 10, 11, 1]
    out = join_and_truncate(prompt, target, max_length=6)
    assert out == {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100] * 4 + [9, 10]}
    out = join_and_truncate(prompt, target, max_length=3)  # prompt alone too long
    assert out == {"input_ids": [7, 8, 9], "labels": [-100, -100, 9]}
    assert join_and_truncate(prompt, target, 100)["input_ids"] == prompt + target


@pytest.mark.parametrize("fmt", ["official", "text"])
def test_encode_prompts_are_the_training_prefix(byt5, fmt):
    ex = Example("name : Beta", "Beta.")
    (ids,) = encode_prompts(byt5, [ex.source], max_length=64, prompt_format=fmt)
    assert encode_example(byt5, ex, 64, fmt)["input_ids"][: len(ids)] == ids
    # An over-long prompt is cut as in training: its last max_length - 1 tokens.
    cut = encode_prompts(byt5, [ex.source], max_length=4, prompt_format=fmt)[0]
    assert cut == ids[-3:] == encode_example(byt5, ex, 4, fmt)["input_ids"][:3]


def test_unknown_prompt_format_is_refused(byt5):
    with pytest.raises(UserError, match="task.prompt_format='bar'"):
        encode_prompts(byt5, ["x"], max_length=64, prompt_format="bar")


# ---- batching --------------------------------------------------------------------------

def padding_fraction(batches, lengths):
    lengths = np.asarray(lengths)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    return 1 - lengths.sum() / padded


def test_length_grouped_batches_cover_group_and_reproduce():
    lengths = np.random.default_rng(0).integers(10, 300, size=1003).tolist()
    batches = length_grouped_batches(lengths, batch_size=8, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert sum(len(b) < 8 for b in batches) == 1
    random_batches = [list(range(i, min(i + 8, 1003))) for i in range(0, 1003, 8)]
    grouped, rand = padding_fraction(batches, lengths), padding_fraction(random_batches, lengths)
    assert grouped < 0.1 * rand, (grouped, rand)
    assert batches == length_grouped_batches(lengths, 8, seed=1, epoch=0)
    assert batches != length_grouped_batches(lengths, 8, seed=1, epoch=1)
    assert batches != length_grouped_batches(lengths, 8, seed=2, epoch=0)


def test_length_grouped_batches_options():
    lengths = list(range(1, 22))
    dropped = length_grouped_batches(lengths, 4, seed=0, epoch=0, drop_last=True)
    assert len(dropped) == 5 and all(len(b) == 4 for b in dropped)
    first = length_grouped_batches(lengths, 4, seed=0, epoch=3, longest_first=True)
    assert 20 in first[0]


def test_collate_pads_right_with_masks(byt5):
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(feats, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert collate(feats, pad_id=50256, multiple_of=8)["input_ids"].shape == (2, 8)
    assert collate(feats, pad_id=0, pad_to=bucket_length(3, [4, 16]))["labels"].shape == (2, 4)
    with pytest.raises(UserError):
        collate(feats, pad_id=0, pad_to=2)
    enc = encode_dataset(byt5, synthetic_task(n_train=4).train[:5], 512)
    batch = collate(enc, pad_id=byt5.pad_token_id)
    assert batch["input_ids"].shape == (5, max(len(e["input_ids"]) for e in enc))
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(
        sum(x != IGNORE_INDEX for x in e["labels"]) for e in enc)


def test_bucket_length():
    assert [bucket_length(n, [256, 64, 128]) for n in (1, 64, 65, 256)] == [64, 64, 128, 256]
    with pytest.raises(UserError, match="largest length bucket"):
        bucket_length(257, [64, 256])
