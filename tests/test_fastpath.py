"""The fast training path, on CPU with the `aot_eager` backend (inductor's C++ build and CUDA
graphs are the GPU's): static batches keep the loss, one graph serves every length, and the
warm-up compiles every shape up front without changing what training computes."""

import functools
import json
from contextlib import nullcontext

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import GPT2Config, GPT2LMHeadModel

from lora_repro import fastpath, rundir
from lora_repro.data import collate
from lora_repro.lora import apply_lora
from lora_repro.trainer import lm_loss, train
from tests.test_train import QUICK, make_cfg

PAD = 0
compile_cpu = functools.partial(fastpath.compile_loss, backend="aot_eager")


def tiny_lora_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                       n_positions=128, bos_token_id=1, eos_token_id=1))
    apply_lora(model, "qv", 2, 16, 0.1)
    return model.train()


def features(lengths: list[int], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(2, 64, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return out


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_static_batch_pads_rows_and_length_without_changing_the_loss():
    model = tiny_lora_model().eval()
    feats = features([5, 9, 13])
    static = fastpath.static_batch(feats, PAD, batch_size=4, buckets=[16, 32])
    assert static["input_ids"].shape == static["labels"].shape == (4, 16)
    assert (static["labels"][3] == -100).all()  # the empty row adds no target
    plain = collate(feats, PAD)
    assert plain["input_ids"].shape == (3, 13)
    with torch.no_grad():
        a = lm_loss(model, static["input_ids"], static["labels"])
        b = lm_loss(model, plain["input_ids"], plain["labels"])
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("full", [False, True])
def test_padded_vocabulary_gives_the_same_loss_and_gradients(full):
    """The fast path's LM head padded to aligned rows (vocab 70 -> 128): logits sliced back,
    so loss and gradients (LoRA factors, or every weight with the head tied to the
    embedding) are the plain ones."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=70,
                                       n_positions=64, resid_pdrop=0, embd_pdrop=0,
                                       attn_pdrop=0))
    if full:
        model.requires_grad_(True)
    else:
        apply_lora(model, "qv", 2, 16, 0.0)
        for m in model.modules():  # B starts at 0: make the factors' gradients non-trivial
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B)
    batch = collate(features([6, 11, 9], seed=3), PAD)
    grads = []
    for multiple in (1, 64):
        model.zero_grad()
        loss = lm_loss(model, batch["input_ids"], batch["labels"], 0.1,
                       vocab_multiple=multiple)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                      if p.requires_grad}))
    (loss1, g1), (loss64, g64) = grads
    torch.testing.assert_close(loss64, loss1, rtol=1e-6, atol=1e-6)
    assert g1.keys() == g64.keys() and len(g1) > 0
    assert g64["transformer.wte.weight" if full else next(iter(g64))].abs().sum() > 0
    for name in g1:
        torch.testing.assert_close(g64[name], g1[name], rtol=1e-5, atol=1e-6)


def test_one_graph_serves_every_bucket_and_nothing_compiles_after_warm_up():
    model = tiny_lora_model()
    buckets = fastpath.length_buckets(128)
    lengths = [7, 20, 33, 47, 64, 90, 128]
    shapes = fastpath.batch_shapes(lengths, 4, buckets)
    assert shapes == [(4, 16), (4, 32), (4, 48), (4, 64), (4, 96), (4, 128)]
    loss_fn = compile_cpu(lm_loss)
    fastpath.warm_up(loss_fn, model, shapes, nullcontext)
    assert counters["stats"]["unique_graphs"] == 1  # a symbolic length
    assert all(p.grad is None for p in model.parameters())  # the warm-up's gradients dropped
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in lengths:  # a recompilation here would raise
            batch = fastpath.static_batch(features([n, max(2, n - 3)]), PAD, 4, buckets)
            loss_fn(model, batch["input_ids"], batch["labels"]).backward()
    assert counters["stats"]["unique_graphs"] == 1


def test_warm_up_leaves_training_bit_identical():
    """Dropout draws from the RNG and the warm-up runs training steps: it must restore the
    streams and drop its gradients, so the same steps give the same weights."""

    def trained(warm: bool) -> dict[str, torch.Tensor]:
        torch._dynamo.reset()
        model = tiny_lora_model(seed=3)
        loss_fn = compile_cpu(lm_loss)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        torch.manual_seed(7)
        if warm:
            fastpath.warm_up(loss_fn, model, [(4, 16)], nullcontext)
        for n in (12, 16, 9):
            batch = fastpath.static_batch(features([n, n - 1, 3], seed=n), PAD, 4, [16])
            loss_fn(model, batch["input_ids"], batch["labels"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    a, b = trained(warm=False), trained(warm=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_fast_run_compiles_up_front_and_learns_as_the_plain_path(tmp_path, monkeypatch):
    monkeypatch.setattr(fastpath, "compile_loss", compile_cpu)
    # No dropout: padded shapes draw other dropout masks, which is no error of the fast path.
    base = [*QUICK, "eval.test=false", "task.n_train=24", "max_steps=8", "logger.every=2",
            "dropout=0"]
    train(make_cfg(*base, "compile=true"), tmp_path / "fast")
    assert counters["stats"]["unique_graphs"] == 1
    train(make_cfg(*base, "compile=false"), tmp_path / "plain")

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / rundir.METRICS).read_text().splitlines()
        return [x["train_loss"] if "train_loss" in x else x["val_loss"]
                for x in map(json.loads, lines) if "train_loss" in x or "val_loss" in x]

    # the same math; padding and graph capture change rounding only
    assert len(losses("fast")) >= 5  # 4 log steps and the validations
    torch.testing.assert_close(losses("fast"), losses("plain"), rtol=1e-5, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("targets", ["qv", "qkvo"])
def test_cuda_graphs_train_every_bucket_after_warm_up(targets):
    """On CUDA, with inductor and CUDA graphs: the warm-up records every shape (its gradients
    live in graph memory, which a second replay would overwrite) and training then neither
    recompiles nor reads overwritten memory."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128,
                                       n_positions=128, bos_token_id=1, eos_token_id=1))
    apply_lora(model, targets, 2, 16, 0.1)
    model.cuda().train()
    buckets = fastpath.length_buckets(128)
    lengths = [20, 40, 70, 100]
    loss_fn = fastpath.compile_loss(lm_loss)
    bf16 = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    fastpath.warm_up(loss_fn, model, fastpath.batch_shapes(lengths, 4, buckets), bf16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in lengths * 2:
            batch = fastpath.static_batch(features([n, n - 5], seed=n), PAD, 4, buckets)
            fastpath.step_begin()
            with bf16():
                loss = loss_fn(model, batch["input_ids"].cuda(), batch["labels"].cuda())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            assert torch.isfinite(loss).item()
    # One graph for every length: with inductor's shape padding on, its length guards had
    # made 2 (qv) and 3 (qkvo) on an H200.
    assert counters["stats"]["unique_graphs"] == 1
