"""Files the paper-style plots write (`analysis.plots`): PNG, PDF and CSVs of every grid."""

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import plots
from lora_repro.errors import UserError


def grid(k1, k2, seed=0):
    return torch.rand(k1, k2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_figure_files(written, stem):
    """PNG and PDF exist with their magic bytes; no temporary file is left beside them."""
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    assert {png, pdf} <= set(written)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
    assert not [p for p in stem.parent.iterdir() if p.name.startswith(".")]


def read_grid(path):
    frame = pd.read_csv(path, index_col=0)
    return frame.index, frame.columns, frame.to_numpy()


def test_rank_similarity_writes_full_grids_as_csv(tmp_path):
    grids = {"ΔWq": grid(8, 64, 1), "ΔWv": grid(8, 64, 2)}
    written = plots.plot_rank_similarity(grids, tmp_path / "fig3.png", zoom=4)
    assert_figure_files(written, tmp_path / "fig3")
    assert {p.name for p in written if p.suffix == ".csv"} == {"fig3_dWq.csv", "fig3_dWv.csv"}
    index, columns, values = read_grid(tmp_path / "fig3_dWv.csv")
    assert index.name == "i" and list(index) == list(range(1, 9))
    assert list(columns) == [str(j) for j in range(1, 65)]  # the full grid, not the zoom
    np.testing.assert_allclose(values, grids["ΔWv"].numpy(), rtol=0, atol=1e-15)


def test_seed_similarity_adds_the_random_grid(tmp_path):
    written = plots.plot_seed_similarity({"ΔWq, layer 2": grid(6, 6)}, grid(6, 6, 3),
                                         tmp_path / "fig4", k=4)
    assert_figure_files(written, tmp_path / "fig4")
    names = {p.name for p in written if p.suffix == ".csv"}
    assert names == {"fig4_dWq_layer_2.csv", "fig4_Random_Gaussian.csv"}
    _, _, values = read_grid(tmp_path / "fig4_Random_Gaussian.csv")
    np.testing.assert_allclose(values, grid(6, 6, 3).numpy(), rtol=0, atol=1e-15)


def test_layer_similarity_titles_layers_one_based(tmp_path):
    across = {"ΔWq": {0: grid(4, 8), 3: grid(4, 8, 1)}, "ΔWv": {0: grid(4, 8, 2),
                                                              3: grid(4, 8, 3)}}
    written = plots.plot_layer_similarity(across, tmp_path / "fig6")
    assert_figure_files(written, tmp_path / "fig6")
    assert {p.name for p in written if p.suffix == ".csv"} == {
        "fig6_dWq_layer_1.csv", "fig6_dWq_layer_4.csv", "fig6_dWv_layer_1.csv",
        "fig6_dWv_layer_4.csv"}
    with pytest.raises(UserError, match="same layers"):
        plots.plot_layer_similarity({"ΔWq": {0: grid(4, 8)}, "ΔWv": {1: grid(4, 8)}},
                                    tmp_path / "bad")


def test_line_plots_write_one_csv_column_per_curve(tmp_path):
    ks = [1, 2, 4, 8]
    phi = {"r = 1": [0.4, 0.6, 0.9, 1.0], "r = 4": [0.1, 0.2, 0.3, 1.0],
           "FT, r = 4": [0.2, 0.3, 0.4, 1.0]}
    baselines = {label: [max(k, r) / 8 for k in ks]
                 for label, r in (("r = 1", 1), ("r = 4", 4), ("FT, r = 4", 4))}
    written = plots.plot_weight_similarity(ks, phi, tmp_path / "fig8", baselines)
    assert_figure_files(written, tmp_path / "fig8")
    curves = pd.read_csv(tmp_path / "fig8.csv", index_col="k")
    assert list(curves.index) == ks and list(curves.columns) == [
        "r = 1", "r = 4", "FT, r = 4", "random, r = 1", "random, r = 4", "random, FT, r = 4"]
    assert curves.loc[8, "r = 4"] == 1.0
    assert list(curves["random, r = 1"]) == [1 / 8, 2 / 8, 4 / 8, 1.0]  # each curve its own
    assert list(curves["random, r = 4"]) == [4 / 8, 4 / 8, 4 / 8, 1.0]
    with pytest.raises(UserError, match="no curve"):
        plots.plot_weight_similarity(ks, phi, tmp_path / "bad", {"r = 8": [0.5] * 4})

    lines = {f"layer {n}": [10.0 * n, 5.0, 1.0] for n in range(1, 13)}  # > 8: a colourbar
    written = plots.plot_amplification([4, 16, 64], lines, tmp_path / "amp")
    assert_figure_files(written, tmp_path / "amp")
    factors = pd.read_csv(tmp_path / "amp.csv", index_col="r")
    assert list(factors.columns) == list(lines) and factors.loc[4, "layer 12"] == 120.0


def test_nothing_to_plot_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nothing to plot"):
        plots.plot_similarity_row({}, tmp_path / "empty")
