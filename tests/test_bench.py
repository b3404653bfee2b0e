"""Every benchmark script runs in its tiny CPU mode, so none of them rots between GPU runs."""

import json

import pytest

from bench import analysis_grid, inference, train_step

pytest.importorskip("peft")  # the baselines need the `bench` extra


def test_train_step_tiny(tmp_path):
    out = tmp_path / "train_step.json"
    train_step.main(["--tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {r["setup"]: r for r in result["tables"][0]["rows"]}
    assert len(rows) == 7 and all(r["ms_per_step"] > 0 for r in rows.values())
    assert rows["peft LoRA, fp32, padded to 512"]["tokens_per_s"] > 0
    fast, plain = result["curves"]["fast"], result["curves"]["plain"]
    assert fast == plain  # on CPU both are the eager path from the same seed and batches


def test_inference_tiny(tmp_path):
    out = tmp_path / "inference.json"
    inference.main(["--tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["setup"] for r in result["tables"][0]["rows"]] == [
        "base model", "LoRA qv r=4, unmerged", "LoRA qv r=4, merged"]
    assert result["decode_s"] > 0


def test_analysis_grid_tiny(tmp_path):
    out = tmp_path / "analysis_grid.json"
    seconds = analysis_grid.main(["--tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["command"] == "python -m bench.analysis_grid --tiny"
    assert "4 matrices (2 layers x Wq, Wv), d = 128" in result["notes"][0]
    rows = {r["stage"]: r for r in result["tables"][0]["rows"]}
    assert list(rows) == ["fig3", "fig4", "table7+fig8", "erank", "total"]
    assert all(rows[name]["s"] == s > 0 for name, s in seconds.items())
    assert rows["total"]["s"] == pytest.approx(sum(seconds.values()))
