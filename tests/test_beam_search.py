"""The batched beam search equals the official microsoft/LoRA `gpt2_beam.py`, output for output.

`official_beam` below is that script's decoding loop (commit c4593f0), ported line by line for
one query at a time (its README decodes with `--batch_size 1`); only the model call differs:
the official `model(token_id, past=past, len_past=len_past)` is Hugging Face's incremental
decoding with a KV cache.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from lora_repro.beam_search import banned_ngram_mask, official_beam_search

# ---- the official code, ported (names and statements kept) ------------------------------


def _calc_banned_ngram_tokens(prev_input_ids, num_hypos, no_repeat_ngram_size, cur_len):
    if cur_len + 1 < no_repeat_ngram_size:
        return [[] for _ in range(num_hypos)]
    generated_ngrams = [{} for _ in range(num_hypos)]
    for idx in range(num_hypos):
        gen_tokens = prev_input_ids[idx].tolist()
        generated_ngram = generated_ngrams[idx]
        for ngram in zip(*[gen_tokens[i:] for i in range(no_repeat_ngram_size)], strict=False):
            prev_ngram_tuple = tuple(ngram[:-1])
            generated_ngram[prev_ngram_tuple] = generated_ngram.get(prev_ngram_tuple, []) + [
                ngram[-1]]

    def _get_generated_ngrams(hypo_idx):
        start_idx = cur_len + 1 - no_repeat_ngram_size
        ngram_idx = tuple(prev_input_ids[hypo_idx, start_idx:cur_len].tolist())
        return generated_ngrams[hypo_idx].get(ngram_idx, [])

    return [_get_generated_ngrams(hypo_idx) for hypo_idx in range(num_hypos)]


def _postprocess_next_token_scores(scores, history, cur_len, batch_size, num_beams,
                                   no_repeat_ngram_size, events):
    if no_repeat_ngram_size > 0 and history is not None:
        banned_batch_tokens = _calc_banned_ngram_tokens(
            history, batch_size * num_beams, no_repeat_ngram_size, cur_len)
        for i, banned_tokens in enumerate(banned_batch_tokens):
            scores[i, banned_tokens] = -float("inf")
            events["banned"] += len(banned_tokens)
    return scores


def _add_beam_candidate(best_score, best_sequence, batch_size, num_beams, beam_scores, history,
                        length_penalty, eos_token_id=None, events=None):
    last_tokens = history[:, -1]
    for _i in range(batch_size * num_beams):
        if eos_token_id is None or last_tokens[_i] in eos_token_id:
            cur_len = history.shape[-1]
            _score = beam_scores.view(-1)[_i] / cur_len ** length_penalty
            batch_id = _i // num_beams
            if batch_id not in best_score or best_score[batch_id] < _score:
                best_score[batch_id] = _score
                best_sequence[batch_id][:cur_len] = history[_i]
            beam_scores.view(-1)[_i] = -float("inf")
            if eos_token_id is not None and events is not None:
                events["finished"] += 1


def official_beam(model, query, *, beam, length_penalty, no_repeat_ngram_size, eval_len,
                  eos_token_id, events):
    """gpt2_beam.py's `beam()` for one query: the `predict` list it writes (eval_len ids)."""
    batch_size, num_beams = 1, beam
    _batch = torch.arange(0, batch_size, dtype=torch.long)
    _query = torch.tensor([query]).repeat(1, num_beams).view(batch_size * num_beams, -1)
    beam_scores = torch.zeros((batch_size, num_beams), dtype=torch.float)
    best_sequence = torch.zeros((batch_size, eval_len), dtype=torch.long)
    best_score = {}
    history = token_id = None
    past = DynamicCache()
    for i in range(0, eval_len):
        if i == 0:
            logits = model(_query, past).logits[:, -1, :]
        else:
            logits = model(token_id, past).logits[:, -1, :]
        logits = _postprocess_next_token_scores(logits, history, i, batch_size, num_beams,
                                                no_repeat_ngram_size, events)
        softmax_probs = F.softmax(logits, dim=-1)
        vocab_size = softmax_probs.shape[-1]
        _logprob = torch.log(softmax_probs)
        if i == 0:
            next_scores = _logprob.view(batch_size, num_beams, -1)[:, 0, :]
        else:
            next_scores = beam_scores.unsqueeze(-1) + _logprob.view(batch_size, num_beams, -1)
            next_scores = next_scores.view(batch_size, -1)
        next_scores, next_tokens = torch.topk(next_scores, num_beams, dim=1, largest=True,
                                              sorted=True)
        beam_id = (next_tokens // vocab_size).view(-1)
        token_id = (next_tokens % vocab_size).view(-1).unsqueeze(-1)
        beam_idx = beam_id.view(batch_size, num_beams) + (_batch * num_beams).unsqueeze(-1)
        past.reorder_cache(beam_idx.view(-1))
        beam_scores = next_scores
        if history is None:
            history = token_id.detach()
        else:
            history = torch.cat((history[beam_idx.view(-1)], token_id.detach()), dim=1).detach()
        _add_beam_candidate(best_score, best_sequence, batch_size, num_beams, beam_scores,
                            history, length_penalty, eos_token_id=eos_token_id, events=events)
    _add_beam_candidate(best_score, best_sequence, batch_size, num_beams, beam_scores, history,
                        length_penalty)
    return best_sequence[0].tolist()


# ---- tests ------------------------------------------------------------------------------

END_IDS = [0, 1]  # eos, and a second end id (GPT-2's "\n\n", 628, in the official E2E command)


def random_model(seed: int) -> GPT2LMHeadModel:
    """A tiny random GPT-2 with peaked next-token distributions: beams end often (END_IDS get
    a logit bonus) and repeat n-grams often (a 24-token vocabulary)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=24, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=0, eos_token_id=0,
                        initializer_range=0.3, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
        model.lm_head.weight[END_IDS] += 0.5 * model.transformer.ln_f.weight
    return model


def padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), 5)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    return ids, mask


@pytest.mark.parametrize("seed, beam, ngram, lp", [(0, 1, 4, 0.9), (1, 3, 2, 0.8),
                                                   (2, 5, 3, 0.9), (3, 10, 4, 0.8)])
def test_batched_search_equals_the_official_loop(seed, beam, ngram, lp):
    model = random_model(seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 24, (n,), generator=gen).tolist() for n in (3, 9, 1, 6, 12, 4)]
    eval_len = 24
    events = {"banned": 0, "finished": 0}
    expected = [official_beam(model, p, beam=beam, length_penalty=lp, no_repeat_ngram_size=ngram,
                              eval_len=eval_len, eos_token_id=END_IDS, events=events)
                for p in prompts]
    ids, mask = padded(prompts)
    got = official_beam_search(model, ids, mask, beam=beam, length_penalty=lp,
                               no_repeat_ngram_size=ngram, max_new_tokens=eval_len,
                               end_ids=END_IDS)
    assert [g + [0] * (eval_len - len(g)) for g in got] == expected
    assert events["banned"] > 0 and events["finished"] > 0  # both rules were exercised
    # Outputs end at an end id, or run the full length.
    assert all(g[-1] in END_IDS or len(g) == eval_len for g in got)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_banned_ngram_mask_equals_the_official_lists(n):
    gen = torch.Generator().manual_seed(n)
    history = torch.randint(0, 3, (6, 30), generator=gen)
    expected = _calc_banned_ngram_tokens(history, 6, n, cur_len=history.shape[1])
    mask = banned_ngram_mask(history, n, vocab_size=3)
    assert [sorted(set(b)) for b in expected] == [m.nonzero().view(-1).tolist() for m in mask]
    assert mask.any()
