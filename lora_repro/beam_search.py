"""The paper's beam search, rule for rule: microsoft/LoRA `examples/NLG/src/gpt2_beam.py`
(commit c4593f0), batched and KV-cached over a Hugging Face `GPT2LMHeadModel`.

Written by hand because transformers' `generate` cannot express rule 3 below: its beam search
keeps `beam` unfinished hypotheses running and files finished ones aside, so a finished one
never costs the search a slot. (Rule 1 alone would be `GenerationConfig(renormalize_logits=
True)`: a log-softmax after the ban equals the official softmax-then-log.) The rules, with the
official function that implements each:

1. Scores (`_postprocess_next_token_scores`): the next-token logits of each hypothesis get
   -inf on every token that would repeat an n-gram of its *output* (the prompt is never looked
   at; `_calc_banned_ngram_tokens`, from fairseq), THEN softmax, THEN log. The banned
   probability mass is so renormalized over the other tokens.
2. Candidates (`beam`): step 0 expands the prompt once; every later step takes the top `beam`
   of (beam score + log-probability) over beam x vocab, `torch.topk(sorted=True)`.
3. Finished hypotheses (`_add_beam_candidate`): a candidate whose token is an end id keeps its
   slot for that step; its score / (output length, end id included) ** length_penalty replaces
   the row's best if strictly greater (the first of equal scores wins), and its beam score
   becomes -inf, so it never expands again: a finished hypothesis leaves `beam - 1` running.
4. Last step (`eval_len` = `max_new_tokens`): every hypothesis still running is a candidate,
   scored with length `max_new_tokens`.

Not ported: `min_length` and the repetition penalty, which every README command leaves at 0
and 1.0. A row whose beams are all finished (all scores -inf) can never change its best again
(-inf never beats it), so it leaves the batch early; the official loop runs it to the end.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache

NEG_INF = float("-inf")


def banned_ngram_mask(history: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """Tokens that would repeat an n-gram of each hypothesis's output (gpt2_beam.py's
    `_calc_banned_ngram_tokens`, vectorized): token t is banned after the output's last n-1
    tokens if those n-1 tokens were once followed by t.

    history: (N, L) generated tokens, prompt excluded. Returns a (N, vocab_size) bool mask.
    """
    num, length = history.shape
    mask = torch.zeros(num, vocab_size + 1, dtype=torch.bool, device=history.device)
    if n < 1 or length < n:  # fewer than n tokens: no complete n-gram yet
        return mask[:, :vocab_size]
    windows = history.unfold(1, n, 1)  # (N, L - n + 1, n): every n-gram of the output
    last = history[:, length - n + 1:]  # (N, n - 1): the prefix the next token would extend
    hit = (windows[:, :, :-1] == last[:, None, :]).all(-1)  # (N, L - n + 1)
    tokens = windows[:, :, -1].masked_fill(~hit, vocab_size)  # misses go to a spare column
    return mask.scatter_(1, tokens, True)[:, :vocab_size]


def _stepper(model):
    """`step(input_ids, attention_mask, position_ids)` -> next-token logits (N, V) in fp32 at
    the last position; each call extends one KV cache (`step.cache`) in place."""
    # transformers 5 names the cache argument `cache`, 4.x `past_key_values`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache()

    def step(input_ids, attention_mask, position_ids) -> torch.Tensor:
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids, use_cache=True, logits_to_keep=1, **{key: cache})
        return out.logits[:, -1].float()

    step.cache = cache
    return step


class _Best:
    """Each row's best finished candidate so far (`best_score`, `best_sequence` of
    gpt2_beam.py): score (B,), has (B,), tokens (B, max_new_tokens), length (B,)."""

    def __init__(self, rows: int, max_new_tokens: int, device):
        self.score = torch.full((rows,), NEG_INF, device=device)
        self.has = torch.zeros(rows, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
        self.length = torch.zeros(rows, dtype=torch.long, device=device)

    def offer(self, rows, scores, finished, history, length_penalty: float) -> None:
        """`_add_beam_candidate` for rows `rows` (R,): scores, finished (R, K); history
        (R, K, L). Candidates are the finished entries, in beam order."""
        length = history.shape[-1]
        cand = scores / length ** length_penalty  # (R, K), the official float32 division
        cand = cand.masked_fill(~finished, NEG_INF)
        top, arg = cand.max(dim=1)  # the first of equal maxima, as the official loop keeps
        arg = torch.where(top == NEG_INF, finished.int().argmax(1), arg)  # all -inf: the first
        take = finished.any(1) & (~self.has[rows] | (top > self.score[rows]))
        pick = history[torch.arange(len(rows), device=rows.device), arg]  # (R, L)
        self.score[rows] = torch.where(take, top, self.score[rows])
        self.has[rows] = self.has[rows] | take
        self.tokens[rows, :length] = torch.where(take[:, None], pick, self.tokens[rows, :length])
        self.length[rows] = torch.where(take, length, self.length[rows])


@torch.no_grad()
def official_beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    beam: int,
    length_penalty: float,
    no_repeat_ngram_size: int,
    max_new_tokens: int,
    end_ids: list[int],
) -> list[list[int]]:
    """Beam-decode B prompts at once with the official rules (module docstring).

    input_ids, attention_mask: (B, W) prompts, left-padded (mask 0 on pads); positions count
    from each prompt's first token, as in the official unpadded queries. `end_ids`: the
    official `--eos_token_id` list. Returns, per row, the best hypothesis's token ids, its end
    id included when it ended with one (the official `best_sequence` up to its length).
    """
    model.eval()
    rows_total, width = input_ids.shape
    device = input_ids.device
    best = _Best(rows_total, max_new_tokens, device)
    end = torch.tensor(end_ids, device=device)
    step_model = _stepper(model)
    cache = step_model.cache
    position = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    logits = step_model(input_ids, attention_mask, position)  # (B, V)
    vocab = logits.shape[-1]
    rows = torch.arange(rows_total, device=device)  # original row of each live row
    mask, next_pos = attention_mask, position[:, -1] + 1  # (B, W), (B,)
    scores = torch.zeros(rows_total, 1, device=device)  # (R, k): 1 beam before step 0
    history = torch.zeros(rows_total, 0, dtype=torch.long, device=device)  # (R * k, i)
    token = history.new_empty(0)  # (R * k,): the tokens chosen at the previous step
    for step in range(max_new_tokens):
        live, k = len(rows), scores.shape[1]
        if step > 0:  # feed the tokens chosen at the previous step
            mask = torch.cat([mask, mask.new_ones(live * k, 1)], dim=1)
            logits = step_model(token[:, None], mask, next_pos[:, None])
            next_pos = next_pos + 1
        if no_repeat_ngram_size > 0:  # rule 1: ban, then softmax, then log
            logits = logits.masked_fill(banned_ngram_mask(history, no_repeat_ngram_size, vocab),
                                        NEG_INF)
        logprob = torch.log(F.softmax(logits, dim=-1)).view(live, k, vocab)
        scores, flat = torch.topk((scores[:, :, None] + logprob).view(live, k * vocab), beam,
                                  dim=1, largest=True, sorted=True)  # rule 2, (R, beam)
        source = (flat // vocab + torch.arange(live, device=device)[:, None] * k).view(-1)
        token = (flat % vocab).view(-1)  # (R * beam,)
        cache.reorder_cache(source)
        mask, next_pos = mask[source], next_pos[source]
        history = torch.cat([history[source], token[:, None]], dim=1)
        finished = torch.isin(token, end).view(live, beam)  # rule 3
        best.offer(rows, scores, finished, history.view(live, beam, -1), length_penalty)
        scores = scores.masked_fill(finished, NEG_INF)
        done = best.has[rows] & (scores == NEG_INF).all(1)
        if done.all():
            return _results(best)
        if done.any():  # drop finished rows from the batch
            keep = (~done).nonzero().squeeze(1)
            flat_keep = (keep[:, None] * beam + torch.arange(beam, device=device)).view(-1)
            cache.reorder_cache(flat_keep)
            rows, scores = rows[keep], scores[keep]
            mask, next_pos, history = mask[flat_keep], next_pos[flat_keep], history[flat_keep]
            token = token[flat_keep]
    # rule 4: after the last step every hypothesis is a candidate
    live = len(rows)
    best.offer(rows, scores, torch.ones_like(scores, dtype=torch.bool),
               history.view(live, beam, -1), length_penalty)
    return _results(best)


def _results(best: _Best) -> list[list[int]]:
    return [t[:n].tolist() for t, n in zip(best.tokens.cpu(), best.length.tolist(), strict=True)]
