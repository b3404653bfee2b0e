"""`analysis.report`: ours beside the paper's values (data files), provenance, reuse of computed
results, and the HTML in a real browser (headless Chromium; skipped without it)."""

import re
from pathlib import Path

import pytest

from analysis import browser, paper, report, tables
from analysis.sweep_runs import Run
from lora_repro import rundir
from lora_repro.trainer import train
from tests.test_train import QUICK, make_cfg

SHRINK = ["max_steps=4", "task.n_train=32", "batch_size=8"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """runs/rep: r2-s1 (decodes the test set), r2-s2, r4-s1 on W_q, W_v, and a failed job's
    marker: one rank pair and one seed pair."""
    sweep = tmp_path_factory.mktemp("report") / "runs" / "rep"
    for rank, seed in ((2, 1), (2, 2), (4, 1)):
        test = "true" if (rank, seed) == (2, 1) else "false"
        train(make_cfg(*QUICK, *SHRINK, f"rank={rank}", f"seed={seed}", f"eval.test={test}"),
              sweep / f"r{rank}-qv-s{seed}")
    (sweep / ".failed").mkdir()
    (sweep / ".failed" / "r8-qv-s1").write_text("r8-qv-s1: rank=8: out of memory\n")
    return sweep


@pytest.fixture(scope="module")
def built(sweep, tmp_path_factory):
    """The report of `sweep`, built once (with a screenshot where Chromium is installed)."""
    out = tmp_path_factory.mktemp("fig")
    shot = ["--screenshot", str(out / "shot.png")] if browser.chromium() else []
    assert report.main([str(sweep), "--out", str(out), *shot]) == 0
    return out


def fake_run(tmp_path: Path, name: str, config: dict, metrics: dict) -> Run:
    base = {"model": {"id": "gpt2-medium"}, "task": {"name": "e2e", "train_file": "trainset.csv"},
            "method": "lora", "targets": "qv", "rank": 4, "seed": 1}
    summary = {"config": base | config, "metrics": metrics, "trainable_params": 393216}
    return Run(tmp_path / name, summary)


# ---------------------------------------------------------------- paper data


def test_paper_values_are_the_published_ones():
    gpt2m = {"model.id": "gpt2-medium", "task.name": "e2e", "task.train_file": "trainset.csv",
             "method": "lora", "targets": "qv", "rank": 4}
    bleu = paper.lookup("table3", gpt2m, "BLEU")
    assert (bleu.value, bleu.std, bleu.scale) == (70.4, 0.1, 100.0)
    assert bleu.source == "Table 3 (arXiv 2106.09685v2)"
    assert paper.lookup("table3", gpt2m | {"model.id": "gpt2-large"}, "NIST").value == 8.89
    full = {k: v for k, v in gpt2m.items() if k not in ("targets", "rank")} | {"method": "full"}
    assert paper.lookup("table3", full, "CIDEr").value == 2.47
    assert paper.lookup("table18", gpt2m | {"rank": 1024}, "val_loss").value == 1.17
    assert paper.lookup("table18", gpt2m | {"rank": 16}, "METEOR").value == 0.4629
    for other in ({"model.id": "standin"}, {"task.train_file": "devset.csv"}, {"rank": 8},
                  {"targets": "qkvo"}):  # another model, training data, rank, targets
        assert paper.lookup("table3", gpt2m | other, "BLEU") is None
    assert paper.lookup("table6", gpt2m, "accuracy") is None  # GPT-3 only
    gpt3 = {"model.id": "gpt3-175b", "method": "lora", "targets": "qv", "rank": 4}
    assert paper.lookup("table7", gpt3, "norm_dW", layer=48, matrix="q").value == 6.91
    assert paper.lookup("table7", gpt3 | {"rank": 64}, "dW", layer=48, matrix="q").value == 1.9


def test_compare_puts_ours_beside_the_paper_and_says_when_there_is_none(tmp_path):
    runs = [fake_run(tmp_path, f"s{s}", {"seed": s}, {"BLEU": b, "NIST": 8.8, "val_loss": 1.2})
            for s, b in ((1, 0.70), (2, 0.71))]
    runs.append(fake_run(tmp_path, "standin", {"model": {"id": "standin"}},
                         {"BLEU": 0.386, "NIST": 4.61}))
    table = report.compare(runs, "table3", {"BLEU": (100, 1), "val_loss": (1, 2)})
    ours = table[(table["Model & Method"] == "GPT-2 M (LoRA)") & (table["Metric"] == "BLEU")]
    assert ours[["Ours", "n", "Paper", "Δ"]].values.tolist() == [["70.5±.7", 2, "70.4±.1",
                                                                  "+0.1"]]
    loss = table[(table["Model & Method"] == "GPT-2 M (LoRA)") & (table["Metric"] == "Val Loss")]
    assert loss["Paper"].tolist() == [paper.NO_VALUE]  # Table 3 prints no validation loss
    standin = table[table["Model & Method"] == "standin (LoRA)"]
    assert standin["Paper"].tolist() == [paper.NO_VALUE] * 2
    assert standin["Ours"].tolist() == ["38.6", "–"]  # one seed: no std; no val_loss: "–"


def test_paper_grid_fills_the_cells_the_paper_has(tmp_path):
    runs = [fake_run(tmp_path, f"r{r}", {"rank": r}, {"BLEU": 0.7}) for r in (4, 8)]
    grid = tables.targets_rank_grid([run.summary for run in runs])
    cells = report.paper_grid(runs, grid, "BLEU")
    assert cells.loc["Wq, Wv"].tolist() == ["70.38 (Table 18)", "69.57 (Table 18)"]
    standin = [fake_run(tmp_path, "s", {"model": {"id": "standin"}}, {"BLEU": 0.4})]
    assert report.paper_grid(standin, grid, "BLEU") is None


def test_report_is_logged_to_the_sweeps_wandb_group_offline(tmp_path):
    sweep, html = tmp_path / "runs" / "sw", tmp_path / "report.html"
    sweep.mkdir(parents=True)
    html.write_text("<html><body>report</body></html>")
    report.log_report("offline", [sweep], [html])
    (run,) = (sweep / "wandb").glob("offline-run-*")
    assert list(run.glob("*.wandb")) and list(run.glob("files/media/html/report_*.html"))


# ---------------------------------------------------------------- the report


def table_rows(dom: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<table[^>]*id="{table_id}".*?</table>', dom, re.S).group(0)
    return [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]  # header rows: <tr style>


def test_report_builds_reuses_and_holds_the_runs_numbers(sweep, built):
    out = built
    html = (out / "report.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and 'src="data:image/png' in html
    assert "3 complete, 1 failed, 0 incomplete" in " ".join(html.split())
    assert "r8-qv-s1: rank=8: out of memory" in html
    assert (out / "report.md").is_file() and (out / "compare_table3.tex").is_file()
    assert {p.name for p in out.iterdir()} >= {"tables", "subspace", "amplification"}

    # the Table 3 comparison holds each configuration's mean over seeds of summary.json
    summaries = {job: rundir.read_json(sweep / job / rundir.SUMMARY)
                 for job in ("r2-qv-s1", "r2-qv-s2", "r4-qv-s1")}
    rows = {(r[3], r[4]): r for r in table_rows(html, "compare-table3")}
    losses = [summaries[j]["metrics"]["val_loss"] for j in ("r2-qv-s1", "r2-qv-s2")]
    mean, std = sum(losses) / 2, abs(losses[0] - losses[1]) / 2**0.5
    assert rows[("2", "Val Loss")][5:8] == [tables.mean_std(mean, std, 2), "2", paper.NO_VALUE]
    bleu = 100 * summaries["r2-qv-s1"]["metrics"]["BLEU"]
    meteor = 100 * summaries["r2-qv-s1"]["metrics"]["METEOR"]
    assert rows[("2", "BLEU")][5:7] == [f"{bleu:.1f}", "1"]
    assert rows[("2", "MET")][5:8] == [f"{meteor:.1f}", "1", paper.NO_VALUE]
    assert rows[("4", "Val Loss")][5] == f"{summaries['r4-qv-s1']['metrics']['val_loss']:.2f}"

    stamp = (out / "report.html").stat().st_mtime_ns
    figure = out / "subspace" / "r2_vs_r4_layer1.png"
    before = figure.stat().st_mtime_ns
    assert report.main([str(sweep), "--out", str(out)]) == 0  # reuses the computed results
    assert figure.stat().st_mtime_ns == before and (out / "report.html").stat().st_mtime_ns > stamp
    assert "analysis.subspace: reused" in (out / "report.html").read_text()


@pytest.mark.skipif(browser.chromium() is None, reason="needs Chromium (apt-get install chromium)")
def test_report_renders_in_chromium_with_every_figure(built):
    out = built
    assert (out / "shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = browser.dump_dom(out / "report.html")
    n = len(re.findall(r"<img ", dom))
    assert n >= 6  # Figures 3 and 4 per layer, 6 and 7 per matrix, amplification, Figure 8
    assert f'data-images="{n}/{n}"' in dom and 'data-loaded="no"' not in dom
    assert "GPT-2" not in " ".join(r[0] for r in table_rows(dom, "compare-table3"))
