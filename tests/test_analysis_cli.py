"""The analysis commands on one small real sweep: `analysis.subspace`, `analysis.amplification`
and `analysis.tables` (files, values against `analysis.linalg`, warnings, one-line errors)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from transformers import GPT2LMHeadModel

from analysis import amplification, cli, linalg, subspace, tables
from lora_repro import rundir
from lora_repro.errors import UserError
from lora_repro.lora import base_weights, read_adapter
from lora_repro.run_reader import base_model
from lora_repro.trainer import train
from tests.test_train import QUICK, make_cfg

SHRINK = ["max_steps=4", "task.n_train=32", "batch_size=8"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """runs/sweep: r in {8, 64} x seed in {1, 2} on W_q, W_v (r8-s1 decodes the test set, for
    BLEU), a full fine-tuning run, and an incomplete job (run_config.json but no summary)."""
    root = tmp_path_factory.mktemp("analysis")
    sweep = root / "runs" / "sweep"
    for rank in (8, 64):
        for seed in (1, 2):
            test = "true" if (rank, seed) == (8, 1) else "false"
            cfg = make_cfg(*QUICK, *SHRINK, f"rank={rank}", f"seed={seed}", f"eval.test={test}")
            train(cfg, sweep / f"r{rank}-qv-s{seed}")
    train(make_cfg(*QUICK, *SHRINK, "method=full", "eval.test=false"), sweep / "full-s1")
    (sweep / "r8-qv-s3").mkdir()
    (sweep / "r8-qv-s3" / rundir.CONFIG).write_text("{}")  # started, never finished
    return {"root": root, "dir": sweep}


def a_matrix(job: Path, layer: int, letter: str) -> torch.Tensor:
    tensors, _ = read_adapter(job / rundir.ADAPTER)
    return tensors[f"h.{layer}.{letter}.lora_A"]


def read_grid(path: Path) -> torch.Tensor:
    return torch.tensor(pd.read_csv(path, index_col=0).to_numpy())


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


# ---------------------------------------------------------------- subspace


def test_subspace_writes_figures_whose_grids_equal_linalg(sweep, tmp_path, capsys):
    assert subspace.main([str(sweep["dir"]), "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    warned = warnings_in(err)
    assert len(warned) == 1 and "r8-qv-s3" in warned[0] and "incomplete" in warned[0]
    jobs = sweep["dir"]
    for layer in (1, 2):  # the tiny model's two layers: the default first ... last
        for stem in (f"r8_vs_r64_s1_layer{layer}", f"r64_s1_vs_s2_layer{layer}"):
            for suffix in (".png", ".pdf"):
                assert (tmp_path / f"{stem}{suffix}").stat().st_size > 0
    for letter in "qv":
        assert (tmp_path / f"r8_vs_r64_s2_layers_{letter}.png").is_file()
        assert (tmp_path / f"r8_s1_vs_s2_layers_{letter}.png").is_file()

    rank_grid = read_grid(tmp_path / "r8_vs_r64_s1_layer2_dWv_layer_2.csv")
    expected = linalg.subspace_similarity_grid(a_matrix(jobs / "r8-qv-s1", 1, "v"),
                                               a_matrix(jobs / "r64-qv-s1", 1, "v"))
    assert rank_grid.shape == (8, 64)
    torch.testing.assert_close(rank_grid, expected, rtol=0, atol=1e-12)
    seed_grid = read_grid(tmp_path / "r64_s1_vs_s2_layer1_dWq_layer_1.csv")
    expected = linalg.subspace_similarity_grid(a_matrix(jobs / "r64-qv-s1", 0, "q"),
                                               a_matrix(jobs / "r64-qv-s2", 0, "q"))
    torch.testing.assert_close(seed_grid, expected, rtol=0, atol=1e-12)
    random_grid = read_grid(tmp_path / "r64_s1_vs_s2_layer1_Random_Gaussian.csv")
    for grid in (rank_grid, seed_grid, random_grid):
        assert grid.min() >= 0 and grid.max() <= 1 + 1e-12
    across = read_grid(tmp_path / "r8_vs_r64_s1_layers_v_dWv_layer_2.csv")
    torch.testing.assert_close(across, rank_grid)

    # The summary prints phi(A_8, A_64, 1, 1) per layer and matrix (first row: layer 1).
    assert "phi(A_small, A_large, 1, 1)" in out and "random" in out
    row = next(line for line in out.splitlines() if line.startswith("r8_vs_r64_s1"))
    phi_11 = linalg.subspace_similarity(a_matrix(jobs / "r8-qv-s1", 0, "q"),
                                        a_matrix(jobs / "r64-qv-s1", 0, "q"), 1, 1)
    assert row.split()[:3] == ["r8_vs_r64_s1", "1", f"{phi_11:.3f}"]


def test_subspace_options_pick_layers_matrices_and_pairs(sweep, tmp_path, capsys):
    part = tmp_path / "part"  # r8-s1, r64-s1, r64-s2: one rank pair and one seed pair
    for job in ("r8-qv-s1", "r64-qv-s1", "r64-qv-s2"):
        shutil.copytree(sweep["dir"] / job, part / job)
    args = [str(part), "--out", str(tmp_path / "figs"), "--layers", "2", "--matrices", "v",
            "--ranks", "8,64", "--seeds", "1,2"]
    assert subspace.main(args) == 0
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    assert {"r8_vs_r64_layer2.png", "s1_vs_s2_layer2.png", "r8_vs_r64_layers_v.png",
            "s1_vs_s2_layers_v.png", "phi_top.csv", "phi_seed_block.csv"} <= names
    assert not any("layer1" in n or "_q" in n or "dWq" in n for n in names)
    out = capsys.readouterr().out
    expected = linalg.subspace_similarity(a_matrix(part / "r8-qv-s1", 1, "v"),
                                          a_matrix(part / "r64-qv-s1", 1, "v"), 1, 1)
    row = next(line for line in out.splitlines() if line.startswith("r8_vs_r64"))
    assert row.split() == ["r8_vs_r64", "2", f"{expected:.3f}"]


# ---------------------------------------------------------------- amplification


def test_amplification_table7_matches_linalg(sweep, tmp_path, capsys):
    assert amplification.main([str(sweep["dir"]), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Table 7, Wq" in out
    for suffix in (".md", ".tex", ".csv"):
        assert (tmp_path / f"table7_q{suffix}").is_file()
    for stem in ("amplification_q", "weight_similarity_q_layer1", "weight_similarity_q_layer2"):
        assert {p.suffix for p in tmp_path.glob(f"{stem}.*")} == {".png", ".pdf", ".csv"}

    table = pd.read_csv(tmp_path / "table7_q.csv", index_col=[0, 1])
    assert list(table.columns) == ["r = 8", "r = 64", "FT, r = 8", "FT, r = 64"]
    W = base_weights(base_model(sweep["dir"] / "r8-qv-s1"), targets="q")[(1, "q")]
    tensors, meta = read_adapter(sweep["dir"] / "r64-qv-s1" / rundir.ADAPTER)
    dW = float(meta["alpha"]) / 64 * tensors["h.1.q.lora_B"] @ tensors["h.1.q.lora_A"]
    column = table.loc[2, "r = 64"].to_numpy()  # layer 2, rows dW, W, random, norms, factor
    dense = linalg.svd(dW)
    assert column[0] == pytest.approx(linalg.projection_norm(W, dense, 64), rel=1e-6)
    assert column[1] == pytest.approx(linalg.projection_norm(W, linalg.svd(W), 64), rel=1e-9)
    assert column[3] == pytest.approx(float(torch.linalg.matrix_norm(W.double())), rel=1e-9)
    assert column[4] == pytest.approx(float(torch.linalg.matrix_norm(dW)), rel=1e-5)
    assert column[5] == pytest.approx(linalg.amplification_factor(W, dense, 64), rel=1e-5)
    assert 0 < column[2] < column[1]  # random directions catch less of W than W's own

    full = table.loc[1, "FT, r = 8"].to_numpy()
    job = sweep["dir"] / "full-s1"
    tuned = GPT2LMHeadModel.from_pretrained(job / rundir.MODEL).transformer.h[0]
    base = base_model(job).transformer.h[0]
    d = tuned.attn.c_attn.weight.shape[0]  # Conv1D (d_in, 3 d): W_q^T is the first d columns
    dW_q = (tuned.attn.c_attn.weight - base.attn.c_attn.weight)[:, :d].T.detach()
    assert full[4] == pytest.approx(float(torch.linalg.matrix_norm(dW_q.double())), rel=1e-5)
    assert full[4] > 0
    curves = pd.read_csv(tmp_path / "weight_similarity_q_layer1.csv", index_col=0)
    assert list(curves.index) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert list(curves.columns) == ["r = 8", "r = 64", "FT, r = 64", "random, r = 8",
                                    "random, r = 64", "random, FT, r = 64"]
    assert ((curves >= 0) & (curves <= 1 + 1e-9)).all().all()
    assert curves.loc[128].to_numpy() == pytest.approx(1.0)  # all of W's directions
    for label, r in (("r = 8", 8), ("r = 64", 64), ("FT, r = 64", 64)):  # max(k, r) / d_in
        expected = [max(k, r) / 128 for k in curves.index]
        assert list(curves[f"random, {label}"]) == pytest.approx(expected, rel=1e-12)
    factors = pd.read_csv(tmp_path / "amplification_q.csv", index_col=0)
    assert list(factors.index) == [8, 64] and list(factors.columns) == ["layer 1", "layer 2"]
    assert factors.loc[64, "layer 2"] == pytest.approx(column[5])


def test_weight_similarity_gives_each_rank_its_own_random_baseline():
    """Figure 8: the r = 1 curve's baseline at k = 1 is 1 / d_in, not the largest rank's."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 128, generator=g, dtype=torch.float64)  # d_out != d_in: d is d_in
    factors = {r: (torch.randn(96, r, generator=g, dtype=torch.float64),
                   torch.randn(r, 128, generator=g, dtype=torch.float64)) for r in (1, 4)}
    runs = {r: SimpleNamespace(method="lora", rank=r) for r in factors}
    sources = [amplification.Source(runs[r], (r,), "") for r in factors]
    base = SimpleNamespace(svd=lambda run, layer, m: linalg.svd(W))
    updates = SimpleNamespace(svd=lambda run, layer, m: linalg.svd_of_product(*factors[run.rank]))
    ks, curves, baselines = amplification.weight_similarity(sources, updates, base, 0, "q")
    assert ks == [1, 2, 4, 8, 16, 32, 64, 96] and list(baselines) == list(curves)
    assert baselines["r = 1"][0] == 1 / 128 and baselines["r = 4"][0] == 4 / 128
    for label, r in (("r = 1", 1), ("r = 4", 4)):
        assert baselines[label] == pytest.approx([max(k, r) / 128 for k in ks], rel=1e-12)
        expected = linalg.top_singular_similarity(W, linalg.svd_of_product(*factors[r]), ks, r)
        assert curves[label] == pytest.approx(expected.tolist(), rel=1e-12)


# ---------------------------------------------------------------- tables


def test_tables_default_sweep_out_and_bleu_grid(sweep, monkeypatch, capsys):
    monkeypatch.chdir(sweep["root"])  # the newest sweep under runs/, into figures/sweep/tables
    assert tables.main([]) == 0
    out = capsys.readouterr().out
    figures = sweep["root"] / "figures" / "sweep" / "tables"
    for stem in ("table3", "table18", "grid_BLEU"):
        for suffix in (".md", ".tex", ".csv"):
            assert (figures / f"{stem}{suffix}").is_file()
        assert (figures / f"{stem}.md").read_text() in out
    bleu = rundir.read_json(sweep["dir"] / "r8-qv-s1" / rundir.SUMMARY)["metrics"]["BLEU"]
    grid = pd.read_csv(figures / "grid_BLEU.csv", index_col=0)
    assert grid.loc["Wq, Wv", "8"] == pytest.approx(100 * bleu)
    assert pd.isna(grid.loc["Wq, Wv", "64"])  # no r=64 run decoded the test set
    table3 = pd.read_csv(figures / "table3.csv")
    assert set(table3["Model & Method"]) == {"tiny (LoRA)", "tiny (FT)"}


def test_tables_metric_option(sweep, tmp_path, capsys):
    assert tables.main([str(sweep["dir"]), "--out", str(tmp_path), "--metric", "val_loss"]) == 0
    grid = pd.read_csv(tmp_path / "grid_val_loss.csv", index_col=0)
    losses = [rundir.read_json(sweep["dir"] / f"r64-qv-s{s}" / rundir.SUMMARY)["metrics"]
              ["val_loss"] for s in (1, 2)]
    assert grid.loc["Wq, Wv", "64"] == pytest.approx(sum(losses) / 2)


def test_wandb_offline_logs_one_analysis_run_under_the_sweep(sweep, tmp_path):
    before = set((sweep["dir"] / "wandb").glob("offline-run-*"))
    assert tables.main([str(sweep["dir"]), "--out", str(tmp_path), "--wandb", "offline"]) == 0
    runs = sorted(set((sweep["dir"] / "wandb").glob("offline-run-*")) - before)
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    logged = {p.name.rsplit("_", 2)[0] for p in runs[0].glob("files/media/table/*.json")}
    assert logged == {"table3", "table18", "grid_BLEU"}


# ---------------------------------------------------------------- arguments and errors


def test_default_layers_are_first_third_two_thirds_and_last():
    assert cli.default_layers(24) == [0, 7, 15, 23]  # 1-based 1, 8, 16, 24
    assert cli.default_layers(96) == [0, 31, 63, 95]  # the paper's 1, 32, 64, 96
    assert cli.default_layers(2) == [0, 1] and cli.default_layers(1) == [0]
    assert cli.parse_layers("24,1,8", 24) == [0, 7, 23]
    assert cli.parse_matrices("v,q", "qv") == "qv" and cli.parse_matrices(None, "qkv", "q") == "q"
    assert cli.parse_matrices(None, "v", "q") == "v"  # runs without q: what they have


def one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines()
           if not line.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


@pytest.mark.parametrize("command", [subspace, amplification, tables])
def test_empty_sweep_is_one_line_error(command, tmp_path, capsys):
    assert command.main([str(tmp_path), "--out", str(tmp_path / "figs")]) == 2
    assert "no complete run" in one_error(capsys)
    assert not (tmp_path / "figs").exists()


@pytest.mark.parametrize("command,args,match", [
    (subspace, ["--matrices", "x"], "--matrices"),
    (subspace, ["--matrices", "k"], "did not adapt 'k'"),
    (amplification, ["--matrices", "qz"], "--matrices"),
    (subspace, ["--layers", "3"], "layer 3 is out of range"),
    (amplification, ["--layers", "0"], "layer 0 is out of range"),
    (subspace, ["--ranks", "4,64"], "--ranks 4,64"),
    (tables, ["--metric", "TER"], "--metric=TER"),
])
def test_bad_options_are_one_line_errors(sweep, tmp_path, capsys, command, args, match):
    assert command.main([str(sweep["dir"]), "--out", str(tmp_path), *args]) == 2
    assert match in one_error(capsys)
    assert not list(tmp_path.iterdir())


def test_no_pairs_is_one_line_error(sweep, tmp_path, capsys):
    shutil.copytree(sweep["dir"] / "r8-qv-s1", tmp_path / "one" / "r8-qv-s1")
    assert subspace.main([str(tmp_path / "one"), "--out", str(tmp_path / "figs")]) == 2
    assert "differ only in rank or only in seed" in one_error(capsys)


def test_commands_run_as_modules(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", "analysis.tables", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert len(result.stderr.splitlines()) == 1


def test_base_weights_refuse_a_base_that_changed_since_training(sweep):
    from analysis.sweep_runs import BaseWeights, Run

    job = sweep["dir"] / "r8-qv-s1"
    summary = rundir.read_json(job / rundir.SUMMARY)
    assert len(summary["base_fingerprint"]) == 16
    assert BaseWeights("qv")(Run(job, summary))[(0, "q")].shape == (128, 128)
    other = {**summary, "base_fingerprint": "0" * 16}  # as if model.name were retrained since
    with pytest.raises(UserError, match="trained on another base"):
        BaseWeights("qv")(Run(job, other))
