"""Full fine-tuning and from-scratch pretraining on a plain-text corpus (issue 7), on CPU."""

import json
import lzma
import random

import pytest
import torch
from transformers import GPT2LMHeadModel

from lora_repro import run_reader, rundir
from lora_repro.lora import base_weights, delta_weights
from lora_repro.trainer import train
from tests.test_train import QUICK, make_cfg

WORDS = "the cat sat on a mat and then it ran to the door of a house near the river".split()


def losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / rundir.METRICS).read_text().splitlines()]
    return [x["train_loss"] for x in lines if "train_loss" in x]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny GPT-2 pretrained from scratch on an xz-compressed two-document-type corpus."""
    tmp = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) for _ in range(200)]
    with lzma.open(tmp / "docs.txt.xz", "wt") as f:
        f.write("\n<|endoftext|>\n".join(docs))
    cfg = make_cfg("+experiment=standin_pretrain", "model=tiny", "model.tokenizer=byt5",
                   f"task.paths=[{tmp}/docs.txt.xz]", "task.block_size=64",
                   "task.valid_fraction=0.1", f"task.cache_dir={tmp}/cache", "batch_size=8",
                   "max_time_min=null", "max_steps=40", "warmup_steps=4", "lr=3e-3",
                   "logger.every=10", "logger.wandb.mode=disabled", "device=cpu")
    summary = train(cfg, tmp / "run")
    return tmp / "run", summary


def test_pretraining_lowers_loss_and_exports_a_hub_style_dir(pretrained):
    run_dir, summary = pretrained
    curve = losses(run_dir)
    assert curve[-1] < curve[0] - 1.0  # from ~ln(384) = 5.9 to well under 5
    assert summary["metrics"]["val_ppl"] == pytest.approx(
        torch.tensor(summary["metrics"]["val_loss"]).exp().item())
    assert summary["train_tokens"] % 64 == 0 and summary["train_tokens"] > 30 * 8 * 64  # blocks
    model = GPT2LMHeadModel.from_pretrained(run_dir / rundir.MODEL)  # no lora_repro needed
    assert model.config.n_embd == 128


def test_exported_model_is_a_base_for_lora(pretrained, tmp_path):
    run_dir, _ = pretrained
    model_dir = run_dir / rundir.MODEL
    cfg = make_cfg(*QUICK, "eval.test=false", "model.init=pretrained",
                   f"model.name={model_dir}", f"model.tokenizer={model_dir}")
    train(cfg, tmp_path)  # with the exported ByT5 tokenizer, not a GPT-2 one that reads nothing
    tokenizer = run_reader.run_tokenizer(tmp_path, cfg)
    assert tokenizer("ab", add_special_tokens=False).input_ids == [100, 101]
    assert losses(tmp_path)[-1] < losses(tmp_path)[0]
    base = run_reader.base_model(tmp_path)
    exported = GPT2LMHeadModel.from_pretrained(model_dir)
    assert torch.equal(base.transformer.h[1].attn.c_attn.weight,
                       exported.transformer.h[1].attn.c_attn.weight)


def test_full_fine_tuning_lowers_loss_and_gives_dW(tmp_path):
    cfg = make_cfg(*QUICK, "eval.test=false", "method=full", "max_steps=30", "lr=3e-3")
    summary = train(cfg, tmp_path)
    curve = losses(tmp_path)
    assert curve[-1] < curve[0] - 0.5
    assert summary["trainable_params"] == summary["total_params"]
    assert not (tmp_path / rundir.ADAPTER).exists()
    tuned = GPT2LMHeadModel.from_pretrained(tmp_path / rundir.MODEL)
    base = run_reader.base_model(tmp_path)
    dw = run_reader.delta_weights_of(tmp_path)  # the shared API, for LoRA and full runs alike
    assert set(dw) == {(i, m) for i in range(2) for m in "qkvo"}
    d = tuned.config.n_embd
    w_ft = tuned.transformer.h[1].attn.c_attn.weight[:, 2 * d:].T  # v slice, d_out x d_in
    w_0 = base.transformer.h[1].attn.c_attn.weight[:, 2 * d:].T
    torch.testing.assert_close(dw[(1, "v")], w_ft - w_0)
    assert dw[(1, "v")].abs().max() > 0
    same = delta_weights(tuned, base=base, targets="v")
    torch.testing.assert_close(same[(1, "v")], dw[(1, "v")])
    assert base_weights(base, "o")[(0, "o")].shape == (d, d)
