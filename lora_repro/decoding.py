"""Beam-search decoding of the test set with transformers' `generate`, and its scoring.

The paper decodes with beam 10, no-repeat n-gram size 4, length penalty 0.9 for E2E and 0.8
for WebNLG/DART (Table 11; the official repository's README uses 0.8 for E2E too, hence
`task.length_penalty`). As in the official decoder (microsoft/LoRA, `gpt2_beam.py`):

- the length penalty divides a finished beam's log-probability by (output length, eos
  included) ** length_penalty, which is transformers' convention too;
- search runs the full `max_new_tokens` steps and keeps the best finished beam
  (`early_stopping="never"`), rather than stopping at the first `beam` finished ones;
- the no-repeat n-gram rule looks at the output only, never the prompt (`OutputNoRepeatNGram`).

One difference stays: the official decoder lets finished beams take slots among the top
`beam` candidates of a step, transformers keeps `beam` unfinished ones running.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    PreTrainedTokenizerBase,
)

from lora_repro import rundir
from lora_repro.config import TrainConfig
from lora_repro.data import TestSource
from lora_repro.data.encoding import encode_prompts
from lora_repro.lora import lora_settings, merge_lora
from lora_repro.modeling import autocast


class OutputNoRepeatNGram(LogitsProcessor):
    """Ban repeating an n-gram of the output, ignoring the prompt.

    transformers' `no_repeat_ngram_size` counts the prompt of a decoder-only model as text
    already generated, so it would forbid copying any n tokens of the source into the output
    ("5 out of 5" from `customer rating : 5 out of 5`): 91% of E2E test references do that. The
    paper's decoder bans repeats within the output only; this applies transformers' own
    processor to the columns after the (left-padded) prompt, `input_ids[:, prompt_width:]`.
    """

    def __init__(self, ngram_size: int, prompt_width: int):
        self.inner = NoRepeatNGramLogitsProcessor(ngram_size)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.inner(input_ids[:, self.prompt_width:], scores)


@torch.no_grad()
def beam_decode(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sources: list[str],
    *,
    beam: int,
    length_penalty: float,
    no_repeat_ngram_size: int,
    max_new_tokens: int,
    batch_size: int,
    max_prompt_length: int,
    device: torch.device,
) -> list[str]:
    """Decode one output per source, in input order.

    Prompts are sorted by length and left-padded within a batch (so generation continues
    right after each prompt); outputs are cut at eos and stripped.
    """
    model.eval()
    prompts = encode_prompts(tokenizer, sources, max_prompt_length)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    gen = GenerationConfig(
        num_beams=beam, length_penalty=length_penalty, max_new_tokens=max_new_tokens,
        do_sample=False, early_stopping="never",
        eos_token_id=eos, pad_token_id=pad, bos_token_id=eos,
    )
    outputs: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="decode", unit="batch"):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attention_mask[row, width - len(prompts[i]):] = 1
        rules = LogitsProcessorList(
            [OutputNoRepeatNGram(no_repeat_ngram_size, width)] if no_repeat_ngram_size else [])
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            generation_config=gen, logits_processor=rules,
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for i, text in zip(idx, texts, strict=True):
            outputs[i] = " ".join(text.split())  # one line per output
    return outputs


def score(task_metrics: str, references: list[list[str]], predictions: list[str]) -> dict:
    """Official E2E metrics (`e2e`) or BLEU + METEOR (`bleu_meteor`, WebNLG and DART).

    Without Java, METEOR, ROUGE-L and CIDEr are skipped with one warning line, so a GPU
    machine without Java still gets BLEU (and NIST); `python -m lora_repro.evaluate score
    run=DIR` completes the scores elsewhere."""
    try:
        from lora_repro import metrics
        from lora_repro.metrics.coco import JAVA_METRICS
    except ImportError as e:  # a bare GPU machine: keep predictions.txt, score elsewhere
        print(f"warning: not scored ({e}); run `python -m lora_repro.evaluate score run=DIR` "
              "where the metrics packages are installed", file=sys.stderr)
        return {}
    wanted = metrics.E2E_METRICS if task_metrics == "e2e" else ("BLEU", "METEOR")
    if shutil.which("java") is None:
        skipped = [m for m in wanted if m in JAVA_METRICS]
        wanted = [m for m in wanted if m not in JAVA_METRICS]
        print(f"warning: {', '.join(skipped)} skipped: they need Java, which is not on PATH",
              file=sys.stderr)
    if task_metrics == "e2e":
        return metrics.score_e2e(references, predictions, wanted)
    return metrics.score_bleu_meteor(references, predictions, wanted)


def decode_and_score(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    test: list[TestSource],
    cfg: TrainConfig,
    run_dir: Path,
    device: torch.device,
) -> dict:
    """Merge LoRA (decoding then runs at the base model's speed), decode every test source,
    write `predictions.txt` into the run directory and return the test metrics."""
    if lora_settings(model) is not None:
        merge_lora(model)
    with autocast(cfg.precision, device)():
        predictions = beam_decode(
            model, tokenizer, [t.source for t in test],
            beam=cfg.eval.beam, length_penalty=cfg.task.length_penalty,
            no_repeat_ngram_size=cfg.eval.no_repeat_ngram_size,
            max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
            max_prompt_length=cfg.task.max_length, device=device,
        )
    rundir.write_atomic(Path(run_dir) / rundir.PREDICTIONS, "".join(p + "\n" for p in predictions))
    return score(cfg.task.metrics, [list(t.references) for t in test], predictions)


def score_base(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    test: list[TestSource],
    cfg: TrainConfig,
    run_dir: Path,
    device: torch.device,
) -> dict:
    """The base model's test scores, before any training: decoded exactly as the trained
    model will be (`cfg.eval`, `task.length_penalty`), outputs into `base_predictions.txt`.

    Scored with the metrics that need no Java (BLEU and NIST for E2E, BLEU otherwise): the
    JVM of METEOR and the PTB tokenizer costs about 10 CPU seconds a scoring, and BLEU is the
    number that shows what training added."""
    try:
        from lora_repro import metrics
    except ImportError:  # a bare GPU machine: score() warns about the trained model's scores
        return {}
    with autocast(cfg.precision, device)():
        predictions = beam_decode(
            model, tokenizer, [t.source for t in test],
            beam=cfg.eval.beam, length_penalty=cfg.task.length_penalty,
            no_repeat_ngram_size=cfg.eval.no_repeat_ngram_size,
            max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
            max_prompt_length=cfg.task.max_length, device=device,
        )
    rundir.write_atomic(Path(run_dir) / rundir.BASE_PREDICTIONS,
                        "".join(p + "\n" for p in predictions))
    references = [list(t.references) for t in test]
    if cfg.task.metrics == "e2e":
        return metrics.score_e2e(references, predictions, ["BLEU", "NIST"])
    return metrics.score_bleu_meteor(references, predictions, ["BLEU"])
