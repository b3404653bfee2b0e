"""Beam decoding with the official rules (renormalized n-gram ban, finished hypotheses take a
slot, end at "\\n\\n"), on hand-built GPT-2s whose next-token distributions are known."""

import math

import pytest
import torch
from torch import nn
from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from lora_repro.decoding import OutputNoRepeatNGram, beam_decode, cut_output, stop_ids

CYCLE = "abcde"


def successor_model(tokenizer) -> GPT2LMHeadModel:
    """A GPT-2 whose next token depends only on the current one: a->b->c->d->e->a, any other
    byte -> a, and never eos. Blocks add nothing to the residual stream, embeddings are one-hot
    and the head maps each token to its successor, so beam search follows the cycle unless a
    token is banned. (eos's own input dimension, which no prompt uses, carries a constant 1
    through ln_f's bias that the head turns into a large negative eos logit.)"""
    vocab = len(tokenizer)
    config = GPT2Config(vocab_size=vocab, n_embd=vocab, n_layer=1, n_head=1, n_positions=64,
                        tie_word_embeddings=False)
    model = GPT2LMHeadModel(config).eval()
    ids = {c: tokenizer.convert_tokens_to_ids(c) for c in CYCLE}
    eos = tokenizer.eos_token_id
    succ = {ids[c]: ids[CYCLE[(i + 1) % len(CYCLE)]] for i, c in enumerate(CYCLE)}
    with torch.no_grad():
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        model.transformer.wte.weight.copy_(torch.eye(vocab))
        model.transformer.wpe.weight.zero_()
        head = torch.zeros(vocab, vocab)  # d_out x d_in: logits[succ(t)] is large for input t
        for t in range(vocab):
            head[succ.get(t, ids["a"]), t] = 10.0
        head[:, eos] = 0.0
        head[eos, eos] = -1000.0
        model.transformer.ln_f.bias[eos] = 1.0
        model.lm_head.weight.copy_(head)
    return model


def decode(model, tokenizer, sources, no_repeat, decoder="official", **kw):
    settings = dict(beam=3, length_penalty=0.9, max_new_tokens=12, prompt_format="text") | kw
    return beam_decode(model, tokenizer, sources, no_repeat_ngram_size=no_repeat, batch_size=2,
                       max_prompt_length=64, device=torch.device("cpu"), decoder=decoder,
                       **settings)


@pytest.mark.parametrize("decoder", ["official", "hf"])
def test_prompt_ngrams_may_be_copied_output_ngrams_may_not_repeat(decoder):
    tokenizer = ByT5Tokenizer()
    model = successor_model(tokenizer)
    # Without the rule the model cycles; with it, "abcd" may follow the prompt "abcde ||"
    # (transformers' own rule would ban its "d"), and the output's first repeated 4-gram is
    # cut: a b c d e a b c, then "d" would repeat "abcd".
    free = decode(model, tokenizer, ["abcde", "zz"], no_repeat=0, decoder=decoder)
    assert free == ["abcdeabcdeab"] * 2
    banned = decode(model, tokenizer, ["abcde", "zz"], no_repeat=4, decoder=decoder)
    assert all(out.startswith("abcdeabc") and out[8] != "d" for out in banned), banned
    assert banned[0] == banned[1]  # the prompt has no say


@pytest.mark.parametrize("n, output, banned", [(3, [1, 2, 3, 9, 1, 2], 3),
                                               (4, [1, 2, 3, 4, 1, 2, 3], 4)])
def test_output_no_repeat_ngram_bans_the_repeat_of_an_output_ngram(n, output, banned):
    prompt = [7, 1, 2, 5]  # "1 2 5" is in the prompt, and must not ban 5 after "1 2"
    ids = torch.tensor([prompt + output])
    scores = OutputNoRepeatNGram(n, prompt_width=len(prompt))(ids, torch.zeros(1, 10))
    assert scores[0, banned] == float("-inf")
    assert torch.isfinite(scores[0, [i for i in range(10) if i != banned]]).all()


# ---- the official rules, on a GPT-2 whose next token depends on the current one only -------

def lookup_model(vocab: int, eos: int, table: dict[int, dict[int, float]]) -> GPT2LMHeadModel:
    """A GPT-2 with p(next | current) = table[current][next] (tokens missing from `table`
    go to eos). Each table row is a class: embeddings are one-hot classes, blocks add nothing
    to the residual stream, ln_f is the identity and the head holds log p (-30 for p = 0)."""
    classes = {t: c + 1 for c, t in enumerate(table)}  # class 0: every other token
    config = GPT2Config(vocab_size=vocab, n_embd=len(classes) + 1, n_layer=1, n_head=1,
                        n_positions=64, tie_word_embeddings=False, bos_token_id=eos,
                        eos_token_id=eos)
    model = GPT2LMHeadModel(config).eval()
    model.transformer.ln_f = nn.Identity()
    head = torch.full((vocab, len(classes) + 1), -30.0)  # d_out x d_in
    head[eos, 0] = 0.0
    with torch.no_grad():
        for proj in (model.transformer.h[0].attn.c_proj, model.transformer.h[0].mlp.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()
        model.transformer.wpe.weight.zero_()
        wte = torch.zeros(vocab, len(classes) + 1)
        wte[:, 0] = 1.0
        for token, c in classes.items():
            wte[token] = torch.nn.functional.one_hot(torch.tensor(c), len(classes) + 1)
            for nxt, p in table[token].items():
                head[nxt, c] = math.log(p)
        model.transformer.wte.weight.copy_(wte)
        model.lm_head.weight.copy_(head)
    return model


def byte_table(byt5, rows: dict[str, dict[str, float]]) -> dict[int, dict[int, float]]:
    """`rows` with characters as ByT5 ids; "$" is eos, the last token of an official prompt."""
    def tok(c: str) -> int:
        return byt5.eos_token_id if c == "$" else byt5.convert_tokens_to_ids(c)
    return {tok(c): {tok(n): p for n, p in row.items()} for c, row in rows.items()}


def test_banned_mass_is_renormalized_before_beams_compete():
    """Beam 2, no repeated token (n=1). After "a", the banned "a" holds 90% of the mass:
    renormalized, "c" is 0.7, so "ac" (0.6 x 0.7) beats "bc" (0.4 x 0.6); without
    renormalization "ac" has 0.042 and "bc" wins."""
    byt5 = ByT5Tokenizer()
    model = lookup_model(len(byt5), byt5.eos_token_id, byte_table(byt5, {
        "$": {"a": 0.6, "b": 0.4}, "a": {"a": 0.9, "c": 0.07, "d": 0.03},
        "b": {"c": 0.6, "d": 0.4}}))
    kw = dict(beam=2, length_penalty=1.0, max_new_tokens=5, prompt_format="official")
    assert decode(model, byt5, ["x"], no_repeat=1, **kw) == ["ac"]
    assert decode(model, byt5, ["x"], no_repeat=1, decoder="hf", **kw) == ["bc"]


def test_a_finished_hypothesis_takes_a_slot():
    """Beam 2, 2 new tokens, length penalty 1. Step 0's top two are "a" (0.5) and eos (0.3):
    the finished eos keeps its slot, so only "a" goes on and "ac" (log 0.15 / 2) is the best.
    Keeping two unfinished beams ("a" and "b"), transformers finds "b" + eos (log 0.2 / 2)."""
    byt5 = ByT5Tokenizer()
    model = lookup_model(len(byt5), byt5.eos_token_id, byte_table(byt5, {
        "$": {"a": 0.5, "$": 0.3, "b": 0.2}, "a": {"c": 0.3, "d": 0.25, "e": 0.25, "f": 0.2},
        "b": {"$": 1.0}}))
    kw = dict(beam=2, length_penalty=1.0, max_new_tokens=2, prompt_format="official")
    assert decode(model, byt5, ["x"], no_repeat=4, **kw) == ["ac"]
    assert decode(model, byt5, ["x"], no_repeat=4, decoder="hf", **kw) == ["b"]


@pytest.fixture
def gpt2(shared_dir):
    return GPT2TokenizerFast.from_pretrained(shared_dir / "gpt2-tokenizer")


def test_an_output_ends_at_a_blank_line(gpt2):
    """The official E2E command ends a beam at 628 ("\\n\\n") too: " Hi", 628, " more" is
    cut to "Hi"; ending at eos only (the decoder before), the output ran on."""
    hi, more = gpt2.convert_tokens_to_ids(["ĠHi", "Ġmore"])
    eos = gpt2.eos_token_id
    model = lookup_model(len(gpt2), eos, {eos: {hi: 1.0}, hi: {628: 1.0}, 628: {more: 1.0}})
    kw = dict(beam=3, length_penalty=0.9, max_new_tokens=8, prompt_format="official")
    assert stop_ids(gpt2, ["\n\n"]) == [eos, 628]
    assert decode(model, gpt2, ["name : Alpha"], no_repeat=4, **kw) == ["Hi"]
    for decoder in ("official", "hf"):
        assert decode(model, gpt2, ["name : Alpha"], no_repeat=4, decoder=decoder,
                      stop_texts=[], **kw) == ["Hi more"]


def test_stop_texts_of_several_tokens_cut_the_decoded_text():
    byt5 = ByT5Tokenizer()
    assert stop_ids(byt5, ["\n\n"]) == [byt5.eos_token_id]  # two bytes: no stop id
    ids = byt5("Hi there\n\nmore\n", add_special_tokens=False)["input_ids"] + [1, 70, 71]
    assert cut_output(byt5, ids, [1], ["\n\n"]) == "Hi there"
    assert cut_output(byt5, ids, [1], []) == "Hi there more"  # one line; nothing past eos
