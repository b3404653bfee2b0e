"""Beam decoding: the no-repeat n-gram rule sees the output only, as in the paper's decoder."""

import pytest
import torch
from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

from lora_repro.decoding import OutputNoRepeatNGram, beam_decode

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


def decode(model, tokenizer, sources, no_repeat):
    return beam_decode(model, tokenizer, sources, beam=3, length_penalty=0.9,
                       no_repeat_ngram_size=no_repeat, max_new_tokens=12, batch_size=2,
                       max_prompt_length=64, device=torch.device("cpu"))


def test_prompt_ngrams_may_be_copied_output_ngrams_may_not_repeat():
    tokenizer = ByT5Tokenizer()
    model = successor_model(tokenizer)
    # Without the rule the model cycles; with it, "abcd" may follow the prompt "abcde ||"
    # (transformers' own rule would ban its "d"), and the output's first repeated 4-gram is
    # cut: a b c d e a b c, then "d" would repeat "abcd".
    free = decode(model, tokenizer, ["abcde", "zz"], no_repeat=0)
    assert free == ["abcdeabcdeab"] * 2
    banned = decode(model, tokenizer, ["abcde", "zz"], no_repeat=4)
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
