"""The LoRA core: exactness against a hand-edited dense reference, merge, adapters, errors."""

import copy

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from lora_repro.errors import UserError
from lora_repro.lora import (
    apply_lora,
    base_weights,
    count_trainable,
    delta_weights,
    load_adapter,
    lora_factors,
    lora_settings,
    merge_lora,
    read_adapter,
    save_adapter,
    unmerge_lora,
    unwrap_lora,
)

D, LAYERS = 32, 3


def tiny(seed=0, n_embd=D, n_layer=LAYERS):
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=97, n_positions=64,
        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def randomize(model, seed=1):
    """Give every A and B random values, so that dW != 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in lora_factors(model).values():
            a.copy_(torch.randn(a.shape, generator=g))
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def logits(model, seed=2):
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


# Slices of GPT-2's fused c_attn output, written out independently of lora_repro.
COLS = {"q": slice(0, D), "k": slice(D, 2 * D), "v": slice(2 * D, 3 * D)}


def hand_edited(base, deltas):
    """A dense reference: base with W += dW written straight into the Conv1D weights."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for (i, letter), dw in deltas.items():
            block = ref.transformer.h[i]
            if letter in COLS:
                block.attn.c_attn.weight[:, COLS[letter]] += dw.T  # Conv1D is (d_in, d_out)
            else:
                conv = {"o": block.attn.c_proj, "f": block.mlp.c_fc, "p": block.mlp.c_proj}[letter]
                conv.weight += dw.T
    return ref


def test_zero_B_equals_base_exactly():
    base = tiny()
    model = apply_lora(copy.deepcopy(base), "qkvo", rank=4, alpha=32)
    assert torch.equal(logits(model), logits(base))


@pytest.mark.parametrize("targets", ["qv", "q", "k", "qkvo", "vo", "fp", "qkvofp"])
def test_merged_equals_unmerged_equals_hand_edited(targets):
    base = tiny()
    model = randomize(apply_lora(copy.deepcopy(base), targets, rank=4, alpha=16))
    deltas = delta_weights(model)
    assert {letter for _, letter in deltas} == set(targets)
    unmerged = logits(model)
    assert not torch.allclose(unmerged, logits(base), atol=1e-3)  # dW really acts
    torch.testing.assert_close(unmerged, logits(hand_edited(base, deltas)), atol=1e-5, rtol=0)
    merge_lora(model)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for i, block in enumerate(model.transformer.h):
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            conv = block.get_submodule(name)
            conv = getattr(conv, "base", conv)
            original = base.transformer.h[i].get_submodule(name).weight
            torch.testing.assert_close(conv.weight, original, atol=1e-6, rtol=0)


def test_qv_leaves_key_slice_untouched():
    base = tiny()
    model = randomize(apply_lora(copy.deepcopy(base), "qv", rank=2, alpha=8))
    x = torch.randn(3, 5, D)
    out = model.transformer.h[1].attn.c_attn(x)
    ref = base.transformer.h[1].attn.c_attn(x)
    assert torch.equal(out[..., COLS["k"]], ref[..., COLS["k"]])
    assert not torch.allclose(out[..., COLS["q"]], ref[..., COLS["q"]])
    assert not torch.allclose(out[..., COLS["v"]], ref[..., COLS["v"]])
    a, b = lora_factors(model)[(0, "q")]
    assert a.shape == (2, D) and b.shape == (D, 2)
    assert (0, "k") not in lora_factors(model)


def test_delta_and_base_weights_follow_linear_convention():
    base = tiny()
    model = randomize(apply_lora(copy.deepcopy(base), "qvf", rank=3, alpha=6))
    a, b = lora_factors(model)[(2, "f")]
    torch.testing.assert_close(delta_weights(model)[(2, "f")], 2.0 * b @ a)
    assert delta_weights(model)[(2, "f")].shape == (4 * D, D)  # d_out x d_in
    w = base_weights(model)
    assert w[(1, "v")].shape == (D, D) and w[(1, "f")].shape == (4 * D, D)
    conv = base.transformer.h[1].attn.c_attn.weight  # (d_in, 3 * d)
    torch.testing.assert_close(w[(1, "v")], conv[:, COLS["v"]].T)
    merge_lora(model)
    torch.testing.assert_close(base_weights(model)[(1, "v")], w[(1, "v")], atol=1e-6, rtol=0)
    plain = base_weights(base, targets="k")
    conv = base.transformer.h[0].attn.c_attn.weight
    torch.testing.assert_close(plain[(0, "k")], conv[:, COLS["k"]].T)


def test_one_step_changes_only_A_and_B():
    model = apply_lora(tiny(), "qv", rank=4, alpha=32, dropout=0.1).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 97, (2, 9))
    model(ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if n.endswith(("lora_A", "lora_B"))}
    assert changed == trainable


@pytest.mark.parametrize(
    "n_layer,n_embd,targets,rank",
    [(24, 1024, "qv", 4), (12, 768, "qkvo", 8), (2, 64, "q", 1), (3, 32, "vfp", 2)],
)
def test_trainable_parameter_count(n_layer, n_embd, targets, rank):
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    model = apply_lora(model, targets, rank=rank, alpha=32)  # LoRA follows the base's device
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    shapes = {"q": (n_embd, n_embd), "k": (n_embd, n_embd), "v": (n_embd, n_embd),
              "o": (n_embd, n_embd), "f": (4 * n_embd, n_embd), "p": (n_embd, 4 * n_embd)}
    expected = n_layer * sum(rank * sum(shapes[t]) for t in targets)
    assert count_trainable(model) == expected
    if (n_layer, n_embd, targets, rank) == (24, 1024, "qv", 4):
        assert expected == 393_216  # GPT-2 Medium, the paper's setting


def test_adapter_roundtrip_is_bit_exact(tmp_path):
    model = randomize(apply_lora(tiny(), "qvo", rank=4, alpha=32, dropout=0.1))
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = load_adapter(tiny(), path)  # a plain model gets LoRA from the file's settings
    for key, (a, b) in lora_factors(model).items():
        a2, b2 = lora_factors(fresh)[key]
        assert torch.equal(a, a2) and torch.equal(b, b2)
    assert torch.equal(logits(fresh), logits(model))
    assert not list(tmp_path.glob("*.tmp"))


def test_unwrapped_merged_model_is_plain_gpt2(tmp_path):
    model = randomize(apply_lora(tiny(), "qv", rank=4, alpha=32))
    expected = logits(model)
    unwrap_lora(model).save_pretrained(tmp_path)
    plain = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=0)


def one_line_error(fn, *match):
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for m in match:
        assert m in msg, msg


def test_adapter_errors(tmp_path):
    model = randomize(apply_lora(tiny(), "qv", rank=4, alpha=32))
    path = save_adapter(model, tmp_path / "a.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    one_line_error(lambda: load_adapter(tiny(), truncated), "truncated.safetensors")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not a tensor file")
    one_line_error(lambda: load_adapter(tiny(), text), "not a readable safetensors")
    one_line_error(lambda: load_adapter(tiny(), tmp_path / "missing.safetensors"), "does not exist")
    one_line_error(lambda: load_adapter(tiny(n_embd=64), path), "n_embd=32", "n_embd=64")
    one_line_error(lambda: load_adapter(tiny(n_layer=2), path), "n_layer")
    other = apply_lora(tiny(), "qkvo", rank=4, alpha=32)
    one_line_error(lambda: load_adapter(other, path), "targets='qv'", "targets='qkvo'")
    other = apply_lora(tiny(), "qv", rank=4, alpha=8)
    one_line_error(lambda: load_adapter(other, path), "alpha=32", "alpha=8")


def test_failed_load_leaves_the_model_untouched(tmp_path):
    tensors, meta = read_adapter(save_adapter(randomize(apply_lora(tiny(), "qv", 4, 32)),
                                              tmp_path / "a.safetensors"))
    cases = {"missing": {k: v for k, v in tensors.items() if k != "h.1.v.lora_B"},
             "reshaped": tensors | {"h.1.v.lora_B": torch.zeros(D + 1, 4)}}
    for name, broken in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(broken, str(path), metadata=meta)
        plain = tiny()
        before = {k: v.clone() for k, v in plain.state_dict().items()}
        one_line_error(lambda path=path, plain=plain: load_adapter(plain, path), "h.1.v")
        assert lora_settings(plain) is None and plain.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"targets": "qx"}, "'x'"),
        ({"targets": ""}, "at least one letter"),
        ({"targets": "qq"}, "twice"),
        ({"rank": 0}, "rank=0"),
        ({"rank": D + 1}, "rank=33"),
        ({"alpha": 0}, "alpha=0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"dropout": -0.1}, "dropout=-0.1"),
    ],
)
def test_bad_arguments_rejected_before_any_change(kwargs, match):
    model = tiny()
    args = {"targets": "qv", "rank": 4, "alpha": 32.0, "dropout": 0.0, **kwargs}
    one_line_error(lambda: apply_lora(model, **args), match)
    assert count_trainable(model) == sum(p.numel() for p in model.parameters())  # untouched


def test_non_gpt2_model_and_double_apply_rejected():
    one_line_error(lambda: apply_lora(torch.nn.Linear(4, 4), "qv", 2, 4), "not GPT-2-shaped")
    model = apply_lora(tiny(), "qv", 2, 4)
    one_line_error(lambda: apply_lora(model, "qv", 2, 4), "already has LoRA")


def test_init_is_seeded_per_rank_layer_and_matrix():
    """One seed, ranks 8 and 64: no A starts as a prefix of the other (as loralib's shared
    stream makes the first matrix's), so Figure 3's similarity is learned, not initial."""
    def init_a(rank, seed=3):
        torch.manual_seed(seed)
        model = apply_lora(tiny(n_embd=64), "qv", rank=rank, alpha=8)
        return {k: a.detach().clone() for k, (a, _) in lora_factors(model).items()}

    a8, a64, again = init_a(8), init_a(64), init_a(8)
    assert all(torch.equal(a8[k], again[k]) for k in a8)  # reproducible from the seed
    bound = 64 ** -0.5
    for k in a8:
        assert a8[k].abs().max() <= bound and a8[k].std() > 0.5 * bound / 3 ** 0.5
        assert not torch.allclose(a8[k], a64[k][:8])
    assert not torch.equal(a8[0, "q"], a8[0, "v"]) and not torch.equal(a8[0, "q"], a8[1, "q"])
