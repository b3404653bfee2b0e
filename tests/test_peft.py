"""peft in both directions: lora-repro adapters exported for peft give the same logits, peft
adapters import with peft's own dW, and the analysis commands read peft directories."""

import json
import logging
import shutil
import warnings

import pandas as pd
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from analysis import amplification, subspace, tables
from lora_repro import export, rundir
from lora_repro.errors import UserError
from lora_repro.lora import (
    adapter_factors,
    apply_lora,
    delta_weights,
    load_adapter,
    lora_factors,
    read_adapter,
    save_adapter,
)
from lora_repro.lora.peft_files import write_peft
from lora_repro.run_reader import seed_from_name, trained_model
from lora_repro.trainer import train
from tests.test_train import QUICK, make_cfg

D, LAYERS, VOCAB = 16, 2, 50


def tiny_config(n_embd=D):
    return GPT2Config(n_layer=LAYERS, n_embd=n_embd, n_head=2, vocab_size=VOCAB, n_positions=32,
                      bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("peft") / "base"
    GPT2LMHeadModel(tiny_config()).save_pretrained(path)
    return path


def load(path) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(path).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def exported(base_dir, out, targets, rank=4, alpha=8.0) -> GPT2LMHeadModel:
    """Our model with LoRA on `targets` (random nonzero B), written to `out` for peft."""
    model = apply_lora(load(base_dir), targets, rank, alpha)
    with torch.no_grad():
        for _, b in lora_factors(model).values():
            b.copy_(0.1 * torch.randn(b.shape, generator=torch.Generator().manual_seed(b.numel())))
    save_adapter(model, out.with_suffix(".safetensors"))
    tensors, meta = read_adapter(out.with_suffix(".safetensors"))
    write_peft(out, adapter_factors(tensors, meta), meta, str(base_dir))
    return model


def peft_load(base_dir, out, caplog) -> PeftModel:
    """PeftModel.from_pretrained, asserting it warns of no missing or unexpected key."""
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load(base_dir), str(out)).eval()
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "missing" in m.lower() or "unexpected" in m.lower()], said
    return model


@pytest.mark.parametrize("targets", ["qv", "qkvo", "v", "qkvofp"])
def test_exported_adapter_gives_peft_the_same_logits(base_dir, tmp_path, caplog, targets):
    ours = exported(base_dir, tmp_path / "adapter", targets)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    theirs = peft_load(base_dir, tmp_path / "adapter", caplog)
    x = tokens()
    with torch.no_grad():
        expected = ours(x).logits
        assert (expected - load(base_dir)(x).logits).abs().max() > 1e-3  # the adapter matters
        torch.testing.assert_close(theirs(x).logits, expected, rtol=0, atol=1e-5)
        merged = theirs.merge_and_unload()
        assert type(merged) is GPT2LMHeadModel
        torch.testing.assert_close(merged(x).logits, expected, rtol=0, atol=1e-5)
    # ... and back: the block-diagonal export splits into the same per-matrix factors
    tensors, meta = read_adapter(tmp_path / "adapter")
    assert (meta["targets"], meta["rank"], meta["structure"]) == (targets, "4", "per-matrix")
    again = load_adapter(load(base_dir), tmp_path / "adapter")
    for key, (a, b) in lora_factors(ours).items():
        assert torch.equal(lora_factors(again)[key][0], a)
        assert torch.equal(lora_factors(again)[key][1], b)


def test_untrained_export_keeps_its_layout(base_dir, tmp_path):
    model = apply_lora(load(base_dir), "qvo", 4, 8.0)  # B = 0: the layout is in lora_repro.json
    save_adapter(model, tmp_path / "a.safetensors")
    tensors, meta = read_adapter(tmp_path / "a.safetensors")
    origin = {"config": {"targets": "qvo", "rank": 4}}
    write_peft(tmp_path / "out", adapter_factors(tensors, meta), meta, str(base_dir), origin)
    back, meta = read_adapter(tmp_path / "out")
    assert (meta["targets"], meta["rank"], meta["structure"]) == ("qvo", "4", "per-matrix")
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], t) for k, t in tensors.items())


def test_peft_trained_adapter_imports_with_peft_delta_weights(base_dir, tmp_path, capsys):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True,
                        lora_dropout=0.0)
    model = get_peft_model(load(base_dir), config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        x = tokens()
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "peft-s3")

    ours = load_adapter(load(base_dir), tmp_path / "peft-s3")
    assert "dW's SVD" in capsys.readouterr().err  # q, k, v share A: said once
    dw = delta_weights(ours)
    assert set(dw) == {(i, m) for i in range(LAYERS) for m in "qkv"}
    for i in range(LAYERS):
        layer = model.base_model.model.transformer.h[i].attn.c_attn
        fused = layer.get_delta_weight("default").T  # Conv1D (d_in, 3 d) -> (3 d, d_in)
        assert fused.abs().max() > 1e-4
        for s, m in enumerate("qkv"):
            torch.testing.assert_close(dw[(i, m)], fused[s * D:(s + 1) * D], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()).logits, model.eval()(tokens()).logits,
                                   rtol=0, atol=1e-5)
    _, meta = read_adapter(tmp_path / "peft-s3")
    assert (meta["rank"], meta["targets"], meta["structure"]) == ("4", "qkv", "svd")
    assert seed_from_name("peft-s3") == 3 and seed_from_name("my_adapter") is None

    # two copies named as seeds 3 and 4: a seed pair of the analysis, on the base they name
    for seed in (3, 4):
        shutil.copytree(tmp_path / "peft-s3", tmp_path / "sweep" / f"peft-s{seed}")
    figs = tmp_path / "figs"
    assert subspace.main([str(tmp_path / "sweep"), "--out", str(figs), "--layers", "1",
                          "--matrices", "k"]) == 0
    grid = pd.read_csv(figs / "s3_vs_s4_layer1_dWk_layer_1.csv", index_col=0)
    assert abs(grid.to_numpy().diagonal() - 1).max() < 1e-9
    assert amplification.main([str(tmp_path / "sweep"), "--out", str(figs), "--layers", "1",
                               "--matrices", "k"]) == 0
    column = pd.read_csv(figs / "table7_k.csv", index_col=[0, 1])["r = 4"].to_numpy()
    assert column[4] == pytest.approx(float(dw[(0, "k")].norm()), rel=1e-5)  # ||dW_k||_F


def one_line_error(fn, *match):
    with pytest.raises(UserError) as info:
        fn()
    assert "\n" not in str(info.value)
    for m in match:
        assert m in str(info.value), str(info.value)


def rewrite(path, keys=None, **config):
    """Edit a peft adapter directory: rename tensor keys, update its config."""
    if keys is not None:
        tensors = load_file(path / "adapter_model.safetensors")
        save_file({keys(k): t for k, t in tensors.items()}, path / "adapter_model.safetensors")
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(cfg | config))


def test_peft_adapters_that_cannot_be_read_fail_in_one_line(base_dir, tmp_path, monkeypatch):
    exported(base_dir, tmp_path / "llama", "qv")
    rewrite(tmp_path / "llama", lambda k: k.replace("transformer.h", "model.layers"))
    one_line_error(lambda: read_adapter(tmp_path / "llama"), "not an adapter of GPT-2",
                   "model.layers.0")
    exported(base_dir, tmp_path / "extra", "qv")
    tensors = load_file(tmp_path / "extra" / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, D)
    save_file(tensors, tmp_path / "extra" / "adapter_model.safetensors")
    one_line_error(lambda: read_adapter(tmp_path / "extra"), "cannot map module(s) lm_head")
    exported(base_dir, tmp_path / "dora", "qv")
    rewrite(tmp_path / "dora", use_dora=True)
    one_line_error(lambda: read_adapter(tmp_path / "dora"), "DoRA")
    exported(base_dir, tmp_path / "ranks", "qvo")
    tensors = load_file(tmp_path / "ranks" / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.1.attn.c_proj.lora_{}.weight"
    tensors[key.format("A")] = tensors[key.format("A")][:2].clone()
    tensors[key.format("B")] = tensors[key.format("B")][:, :2].clone()
    save_file(tensors, tmp_path / "ranks" / "adapter_model.safetensors")
    one_line_error(lambda: read_adapter(tmp_path / "ranks"), "h.1.o has 2", "h.0.o has 4")
    exported(base_dir, tmp_path / "small", "qv")
    wider = GPT2LMHeadModel(tiny_config(n_embd=32))
    one_line_error(lambda: load_adapter(wider, tmp_path / "small"), "n_embd=16", "n_embd=32")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    one_line_error(lambda: read_adapter("nobody-h15/no-such-adapter"), "Hugging Face Hub")


# ---------------------------------------------------------------- a run, exported and analysed


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("peft_run") / "r4-qv-s1"
    train(make_cfg(*QUICK, "max_steps=4", "task.n_train=32", "batch_size=8",
                   "eval.test=false", "rank=4", "seed=1"), path)
    return path


def test_export_command_writes_what_peft_loads(run_dir, tmp_path, caplog, capsys):
    assert export.main(["peft", str(run_dir), str(tmp_path / "out")]) == 2
    assert "--save-base" in capsys.readouterr().err  # a random-init base: nowhere to name
    args = ["peft", str(run_dir), str(tmp_path / "out"), "--save-base", str(tmp_path / "base")]
    assert export.main(args) == 0
    assert export.main(args) == 2 and "not empty" in capsys.readouterr().err
    theirs = peft_load(tmp_path / "base", tmp_path / "out", caplog)
    ours = trained_model(run_dir)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x).logits, rtol=0, atol=1e-5)


def test_analysis_reads_an_exported_adapter_next_to_its_run(run_dir, tmp_path):
    sweep = tmp_path / "mixed"
    shutil.copytree(run_dir, sweep / "r4-qv-s1")
    assert export.main(["peft", str(run_dir), str(sweep / "r4-qv-peft-s2"), "--save-base",
                        str(tmp_path / "base")]) == 0  # seed 2 by its name: a seed pair
    figs = tmp_path / "figs"
    assert subspace.main([str(sweep), "--out", str(figs), "--layers", "2"]) == 0
    for layer in (2,):
        for m in "qv":
            grid = pd.read_csv(figs / f"s1_vs_s2_layer{layer}_dW{m}_layer_"
                               f"{layer}.csv", index_col=0).to_numpy()
            assert grid.shape == (4, 4)
            assert abs(grid.diagonal() - 1).max() < 1e-9  # the same A: phi = 1
    assert amplification.main([str(sweep), "--out", str(figs), "--layers", "2"]) == 0
    assert tables.main([str(sweep), "--out", str(figs), "--metric", "val_loss"]) == 0
    only_peft = tmp_path / "only_peft"
    shutil.copytree(sweep / "r4-qv-peft-s2", only_peft / "r4-qv-peft-s2")
    assert amplification.main([str(only_peft), "--out", str(figs / "peft"), "--layers", "2"]) == 0
    table = pd.read_csv(figs / "table7_q.csv", index_col=[0, 1])
    alone = pd.read_csv(figs / "peft" / "table7_q.csv", index_col=[0, 1])
    assert table.to_numpy() == pytest.approx(alone.to_numpy(), rel=1e-5)  # same dW, same W
    assert (sweep / "r4-qv-peft-s2" / rundir.ADAPTER).exists() is False
