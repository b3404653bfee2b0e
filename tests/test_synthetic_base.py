"""The synthetic base of the smoke run: pretrained once, cached, reused, rebuilt if corrupt;
and a run on it scores the base before LoRA (the smoke run's gain is checked by .ci/run)."""

import json
from dataclasses import replace

import pytest
from transformers import GPT2LMHeadModel

from lora_repro import rundir, synthetic_base
from lora_repro.data.synthetic import descriptions, synthetic_task
from lora_repro.train import compose_config, result_line
from lora_repro.trainer import train

STEPS = 40  # a few seconds: enough to test the cache, not to learn the domain


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bases")


def model_cfg(cache, *overrides):
    cfg = compose_config(["+experiment=smoke", f"model.pretrain_steps={STEPS}",
                          f"model.cache_dir={cache}", *overrides])
    return cfg.model


def test_descriptions_never_write_an_mr_and_differ_from_the_task_text():
    docs = descriptions(300)
    assert docs == descriptions(300) and docs != descriptions(300, seed=1)
    assert not any(" : " in d or " | " in d for d in docs)
    task = synthetic_task(n_train=100, n_valid=0, n_test=20)
    refs = {r for t in task.test for r in t.references} | {ex.target for ex in task.train}
    assert not set(docs) & refs  # no task reference is a pretraining document


def test_base_is_built_once_then_loaded_from_the_cache(cache, capsys):
    cfg = model_cfg(cache)
    path = synthetic_base.synthetic_base(cfg)
    assert "pretraining the synthetic base" in capsys.readouterr().err
    info = json.loads((path / synthetic_base.INFO).read_text())
    assert info["steps"] == STEPS and info["last_loss"] < info["first_loss"] - 1.0
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert synthetic_base.synthetic_base(cfg) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    assert capsys.readouterr().err == ""
    other = synthetic_base.synthetic_base(replace(cfg, init_seed=1))  # another key, another base
    assert other != path
    model = GPT2LMHeadModel.from_pretrained(path)
    assert model.config.n_layer == cfg.n_layer and model.config.n_embd == cfg.n_embd


def test_corrupt_cache_is_rebuilt_to_the_same_weights(cache, capsys):
    cfg = model_cfg(cache)
    path = synthetic_base.synthetic_base(cfg)
    digest = synthetic_base.weights_hash(path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    assert synthetic_base.synthetic_base(cfg) == path
    assert "corrupt; rebuilding" in capsys.readouterr().err
    assert synthetic_base.weights_hash(path) == digest  # deterministic: the same bits


def test_run_on_the_base_scores_the_base_before_lora(cache, tmp_path):
    cfg = compose_config([
        "+experiment=smoke", f"model.pretrain_steps={STEPS}", f"model.cache_dir={cache}",
        "max_steps=6", "task.n_train=40", "task.n_valid=4", "task.n_test=3",
        "logger.wandb.mode=disabled", "eval.beam=2", "eval.max_new_tokens=8"])
    summary = train(cfg, tmp_path)
    assert set(summary["base_metrics"]) == {"BLEU", "NIST"}
    assert len((tmp_path / rundir.BASE_PREDICTIONS).read_text().splitlines()) == 3
    line = result_line(tmp_path, summary)
    bleu, base = summary["metrics"]["BLEU"], summary["base_metrics"]["BLEU"]
    assert f"BLEU {bleu:.4f} (base {base:.4f})" in line
    # The run's tokenizer is the base's own (trained on its pretraining text).
    saved = (tmp_path / rundir.TOKENIZER / "tokenizer.json").read_text()
    assert saved == (synthetic_base.synthetic_base(cfg.model) / "tokenizer.json").read_text()
