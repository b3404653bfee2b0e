"""Result tables from hand-made run summaries (`analysis.tables`)."""

import math

import pandas as pd
import pytest

from analysis import tables as T
from lora_repro.errors import UserError


def summary(seed=1, rank=4, targets="qv", method="lora", params=350_208, **metrics):
    values = {"BLEU": 0.69, "NIST": 8.7, "METEOR": 0.46, "ROUGE_L": 0.71, "CIDEr": 2.5,
              "val_loss": 1.2} | metrics
    return {"config": {"model": "gpt2-medium", "task": "e2e", "method": method,
                       "targets": targets, "rank": rank, "seed": seed},
            "metrics": values, "trainable_params": params}


def three_seeds():
    """r = 4 on Wq, Wv with BLEU 70, 71, 72 and NIST 8.86, 8.87, 8.88."""
    return [summary(seed, BLEU=b, NIST=n)
            for seed, b, n in ((1, 0.70, 8.86), (2, 0.71, 8.87), (3, 0.72, 8.88))]


def test_mean_std_prints_like_the_paper():
    assert T.mean_std(70.4, 0.1, 1) == "70.4±.1"
    assert T.mean_std(8.85, 0.02, 2) == "8.85±.02"
    assert T.mean_std(70.0, 12.34, 1) == "70.0±12.3"
    assert T.mean_std(46.8, math.nan, 1) == "46.8"
    assert T.mean_std(math.nan, math.nan, 1) == "–"
    assert T.params_label(350_208) == "0.35M"
    assert T.params_label(354_920_000) == "354.92M"
    assert T.params_label(98_304) == "98.3K"
    assert T.targets_label("qkvo") == "Wq, Wk, Wv, Wo"


def test_aggregate_takes_mean_and_sample_std_over_seeds():
    runs = T.runs_frame(three_seeds() + [summary(1, rank=8)])
    table = T.aggregate(runs, ["BLEU", "NIST"])
    row = table.loc[("gpt2-medium", "e2e", "lora", "qv", 4, "")]
    assert row[("BLEU", "mean")] == pytest.approx(0.71)
    assert row[("BLEU", "std")] == pytest.approx(0.01)  # ddof 1: sqrt(2e-4 / 2)
    assert row[("NIST", "n")] == 3
    single = table.loc[("gpt2-medium", "e2e", "lora", "qv", 8, "")]
    assert single[("BLEU", "n")] == 1 and math.isnan(single[("BLEU", "std")])


def test_table3_scales_formats_and_orders_rows():
    full = summary(1, method="full", params=354_920_000, BLEU=0.682)
    del full["metrics"]["CIDEr"]
    table = T.table3(three_seeds() + [summary(1, rank=1, targets="q", params=98_304), full])
    assert list(table.columns) == ["# Trainable Parameters", "BLEU", "NIST", "MET", "ROUGE-L",
                                   "CIDEr"]
    assert list(table.index) == [
        ("GPT-2 M (FT)", "e2e", "all", "–"),
        ("GPT-2 M (LoRA)", "e2e", "Wq", "1"),
        ("GPT-2 M (LoRA)", "e2e", "Wq, Wv", "4"),
    ]
    lora = table.iloc[2]
    assert lora["BLEU"] == "71.0±1.0" and lora["NIST"] == "8.87±.01"
    assert lora["MET"] == "46.0±.0" and lora["# Trainable Parameters"] == "0.35M"
    # one seed where the others have three: the cell says so
    assert table.iloc[0]["BLEU"] == "68.2 (n=1)" and table.iloc[0]["CIDEr"] == "–"
    assert table.iloc[1]["# Trainable Parameters"] == "98.3K"


def test_summaries_from_summary_json_with_nested_model_and_task():
    s = summary(1)
    s["config"]["model"] = {"id": "gpt2-medium", "name": "/models/gpt2-medium"}
    s["config"]["task"] = {"name": "e2e", "data_dir": None}
    runs = T.runs_frame([s, summary(2)])
    assert set(runs["model"]) == {"gpt2-medium"} and set(runs["task"]) == {"e2e"}


def test_table18_rows_are_ranks_printed_as_the_paper_does():
    runs = [summary(1, rank=r, BLEU=0.6872 + r / 10_000, NIST=8.7215) for r in (64, 1, 8)]
    table = T.table18(runs)
    assert list(table.index) == [1, 8, 64] and table.index.name == "Rank r"
    assert list(table.columns) == ["Val Loss", "BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr"]
    assert table.loc[1, "BLEU"] == "68.73" and table.loc[64, "BLEU"] == "69.36"
    assert table.loc[8, "NIST"] == "8.7215" and table.loc[8, "METEOR"] == "0.4600"
    with pytest.raises(UserError, match="one targets"):
        T.table18(runs + [summary(1, targets="q")])


def test_targets_rank_grid():
    runs = three_seeds() + [summary(1, rank=1, targets="qkvo", BLEU=0.65),
                            summary(1, rank=8, targets="q", BLEU=0.66),
                            summary(1, rank=4, targets="qk", BLEU=0.67)]
    grid = T.targets_rank_grid(runs, "BLEU")
    assert list(grid.index) == ["Wq", "Wq, Wk", "Wq, Wv", "Wq, Wk, Wv, Wo"]
    assert list(grid.columns) == [1, 4, 8]
    assert grid.loc["Wq, Wv", 4] == pytest.approx(71.0)
    assert grid.loc["Wq, Wk, Wv, Wo", 1] == pytest.approx(65.0)
    assert math.isnan(grid.loc["Wq", 1])
    assert T.targets_rank_grid(runs, "NIST").loc["Wq, Wv", 4] == pytest.approx(8.87)


@pytest.mark.parametrize(
    "runs, message",
    [
        ([summary(1), summary(1)], "share a configuration and seed"),
        ([summary(1, BLEU=70.4)], "above 1"),
        ([{"config": {"model": "gpt2"}, "metrics": {}, "trainable_params": 1}], "lacks"),
        ([], "no run summaries"),
        ([summary(1, targets="qx")], "unknown letter"),
    ],
)
def test_bad_summaries_raise_one_line_user_errors(runs, message):
    with pytest.raises(UserError, match=message) as info:
        T.table3(runs)
    assert "\n" not in str(info.value)


def test_writers(tmp_path):
    table = T.table3(three_seeds())
    md = T.write_table(table, tmp_path / "t3.md").read_text()
    assert md.splitlines()[0].split("|")[1].strip() == "Model & Method"
    assert "71.0±1.0" in md
    assert "\\toprule" in T.write_table(table, tmp_path / "t3.tex").read_text()
    grid = T.targets_rank_grid(three_seeds())
    back = pd.read_csv(T.write_table(grid, tmp_path / "grid.csv"), index_col=0)
    assert back.iloc[0, 0] == pytest.approx(grid.iloc[0, 0], rel=1e-12)
    assert "71.0" in T.write_table(grid, tmp_path / "grid.tex").read_text()
    with pytest.raises(UserError, match="allowed suffixes"):
        T.write_table(table, tmp_path / "t3.xlsx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.csv", "grid.tex", "t3.md",
                                                          "t3.tex"]


def test_runs_that_differ_in_more_than_seed_are_kept_apart():
    def at(lr, seed, bleu, rank=4):
        s = summary(seed, rank=rank, BLEU=bleu)
        s["config"]["lr"] = lr
        return s

    summaries = [at(1e-4, 1, 0.60), at(2e-4, 2, 0.70), at(2e-4, 3, 0.72), at(2e-4, 1, 0.5, 8)]
    table = T.table3(summaries)
    assert list(table.index.get_level_values("Setting")) == ["lr=0.0001", "lr=0.0002",
                                                             "lr=0.0002"]
    assert list(table["BLEU"]) == ["60.0 (n=1)", "71.0±1.4", "50.0 (n=1)"]  # 1 seed of 2
    t18 = T.table18(summaries)
    assert list(t18.index) == [(4, "lr=0.0001"), (4, "lr=0.0002"), (8, "lr=0.0002")]
    grid = T.targets_rank_grid(summaries)
    assert list(grid.index) == [("Wq, Wv", "lr=0.0001"), ("Wq, Wv", "lr=0.0002")]
    assert grid.loc[("Wq, Wv", "lr=0.0002"), 4] == pytest.approx(71.0)
    # Same seed, other lr: two settings, not "two runs share a configuration and seed".
    assert len(T.table3([at(1e-4, 1, 0.6), at(2e-4, 1, 0.7)])) == 2
    # A key that differs only between configurations (FT's lr) adds no setting.
    full = summary(1, method="full", params=354_920_000)
    full["config"]["lr"] = 5e-5
    assert "Setting" not in T.table3(three_seeds() + [full]).index.names
