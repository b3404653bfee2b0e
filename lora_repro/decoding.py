"""Beam-search decoding of the test set, and its scoring.

The paper decodes with beam 10, no-repeat n-gram size 4, length penalty 0.9 for E2E and 0.8
for WebNLG/DART (Table 11; the official repository's README uses 0.8 for E2E too, hence
`task.length_penalty`), 64 new tokens (`--eval_len 64`). Decoders (`eval.decoder`):

- ``official`` (default): `lora_repro.beam_search`, the official `gpt2_beam.py` rules with its
  outputs: the no-repeat n-gram ban looks at the output only and comes before the softmax
  (renormalized), a finished hypothesis takes one of the `beam` slots of its step, and its
  score is log-probability / (output length, end id included) ** length_penalty.
- ``hf``: transformers' `generate`, as this toolkit decoded before (kept to compare): the ban
  comes after the log-softmax (the banned mass is lost) and `beam` unfinished beams keep
  running; the n-gram rule also looks at the output only (`OutputNoRepeatNGram`).

End of an output: eos, and each of `eval.stop_texts` (default "\\n\\n"), as in the official
pipeline: its E2E command passes `--eos_token_id 628` (GPT-2's "\\n\\n"), which argparse
appends to the default [50256], and WebNLG and DART follow the same command; `gpt2_decode.py`
then cuts the decoded text at "<|endoftext|>" and "\\n\\n" and strips it (`cut_output`).
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
from lora_repro.beam_search import official_beam_search
from lora_repro.config import TrainConfig
from lora_repro.data import TestSource
from lora_repro.data.encoding import encode_prompts
from lora_repro.data.records import seen_flags
from lora_repro.errors import UserError
from lora_repro.lora import lora_settings, merge_lora
from lora_repro.modeling import autocast

DECODERS = ("official", "hf")


class OutputNoRepeatNGram(LogitsProcessor):
    """Ban repeating an n-gram of the output, ignoring the prompt (for ``decoder=hf``).

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


def stop_ids(tokenizer: PreTrainedTokenizerBase, stop_texts: list[str]) -> list[int]:
    """The end ids: eos, then each stop text that is a single token (GPT-2: "\\n\\n" -> 628;
    a text of several tokens only cuts the decoded output, `cut_output`)."""
    ids = [tokenizer.eos_token_id]
    for text in stop_texts:
        one = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(one) == 1 and one[0] not in ids:
            ids.append(one[0])
    return ids


def cut_output(tokenizer: PreTrainedTokenizerBase, ids: list[int], end_ids: list[int],
               stop_texts: list[str]) -> str:
    """An output's text as `gpt2_decode.py` makes it: cut at the first end id, decoded, cut at
    the first of `stop_texts`, stripped; whitespace runs become one space (one line each)."""
    ends = [i for i, t in enumerate(ids) if t in end_ids]
    text = tokenizer.decode(ids[:ends[0]] if ends else ids, skip_special_tokens=True)
    for stop in stop_texts:
        text = text.split(stop)[0]
    return " ".join(text.split())


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, max length), prompts aligned on the right."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):] = torch.tensor(p)
        attention_mask[row, width - len(p):] = 1
    return input_ids, attention_mask


def _hf_generate(model, input_ids, attention_mask, *, beam, length_penalty, no_repeat_ngram_size,
                 max_new_tokens, end_ids, pad) -> list[list[int]]:
    """``decoder=hf``: transformers' beam search; the generated ids of each row."""
    gen = GenerationConfig(
        num_beams=beam, length_penalty=length_penalty, max_new_tokens=max_new_tokens,
        do_sample=False, early_stopping="never",
        eos_token_id=end_ids, pad_token_id=pad, bos_token_id=end_ids[0],
    )
    width = input_ids.shape[1]
    rules = LogitsProcessorList(
        [OutputNoRepeatNGram(no_repeat_ngram_size, width)] if no_repeat_ngram_size else [])
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                         generation_config=gen, logits_processor=rules)
    return out[:, width:].tolist()


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
    prompt_format: str = "official",
    stop_texts: tuple[str, ...] | list[str] = ("\n\n",),
    decoder: str = "official",
) -> list[str]:
    """Decode one output per source, in input order (see the module docstring for the rules).

    Prompts (`encode_prompts` in the run's `prompt_format`) are sorted by length and
    left-padded within a batch of `batch_size` sources; outputs are cut by `cut_output`.
    """
    if decoder not in DECODERS:
        raise UserError(f"eval.decoder={decoder!r}: allowed values are {DECODERS}")
    model.eval()
    prompts = encode_prompts(tokenizer, sources, max_prompt_length, prompt_format)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    end_ids = stop_ids(tokenizer, list(stop_texts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    settings = dict(beam=beam, length_penalty=length_penalty, max_new_tokens=max_new_tokens,
                    no_repeat_ngram_size=no_repeat_ngram_size)
    outputs: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="decode", unit="batch"):
        idx = order[start:start + batch_size]
        input_ids, attention_mask = (t.to(device) for t in _left_pad([prompts[i] for i in idx],
                                                                     pad))
        if decoder == "official":
            ids = official_beam_search(model, input_ids, attention_mask, end_ids=end_ids,
                                       **settings)
        else:
            ids = _hf_generate(model, input_ids, attention_mask, end_ids=end_ids, pad=pad,
                               **settings)
        for i, out in zip(idx, ids, strict=True):
            outputs[i] = cut_output(tokenizer, out, end_ids, list(stop_texts))
    return outputs


def score(task_metrics: str, references: list[list[str]], predictions: list[str],
          seen: list[tuple[bool, ...]] | None = None) -> dict:
    """Official E2E metrics (`e2e`), GenerationEval's BLEU, METEOR, TER (`generation_eval`,
    WebNLG and DART; with `seen`, per reference, also the seen / unseen parts) or BLEU +
    METEOR (`bleu_meteor`).

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
    wanted = _metric_names(metrics, task_metrics)
    if shutil.which("java") is None:
        skipped = [m for m in wanted if m in JAVA_METRICS]
        wanted = [m for m in wanted if m not in JAVA_METRICS]
        print(f"warning: {', '.join(skipped)} skipped: they need Java, which is not on PATH",
              file=sys.stderr)
    if task_metrics == "e2e":
        return metrics.score_e2e(references, predictions, wanted)
    if task_metrics == "generation_eval":
        return metrics.score_generation_eval(references, predictions, seen, wanted)
    return metrics.score_bleu_meteor(references, predictions, wanted)


def _metric_names(metrics, task_metrics: str) -> tuple[str, ...]:
    """The metrics `score` computes for `task.metrics` (`metrics`: the imported package)."""
    return {"e2e": metrics.E2E_METRICS, "generation_eval": metrics.GENERATION_EVAL_METRICS
            }.get(task_metrics, ("BLEU", "METEOR"))


def start_scoring(task_metrics: str) -> None:
    """Start this process's METEOR now (`coco.shared_meteor`) if `score` will use it: its JVM
    spends about 10 CPU seconds loading METEOR's paraphrase table, which then overlap what
    runs before the scoring (loading the model, training) instead of following it.
    Without Java or the metrics packages, nothing: `score` says what it skips."""
    try:
        from lora_repro import metrics
        from lora_repro.metrics import coco
    except ImportError:
        return
    if "METEOR" in _metric_names(metrics, task_metrics) and shutil.which("java"):
        with coco.shared_meteor():
            pass


def decode_test(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    test: list[TestSource],
    cfg: TrainConfig,
    device: torch.device,
) -> list[str]:
    """One output per test source, decoded with the run's settings: its prompt format,
    `eval.*` (decoder, beam, stop texts, precision) and `task.length_penalty`."""
    with autocast(cfg.eval.precision, device)():
        return beam_decode(
            model, tokenizer, [t.source for t in test],
            beam=cfg.eval.beam, length_penalty=cfg.task.length_penalty,
            no_repeat_ngram_size=cfg.eval.no_repeat_ngram_size,
            max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
            max_prompt_length=cfg.task.max_length, device=device,
            prompt_format=cfg.task.prompt_format, stop_texts=cfg.eval.stop_texts,
            decoder=cfg.eval.decoder,
        )


def decode_and_score(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    test: list[TestSource],
    cfg: TrainConfig,
    run_dir: Path,
    device: torch.device,
    predictions: str = rundir.PREDICTIONS,
) -> dict:
    """Merge LoRA (decoding then runs at the base model's speed), decode every test source
    (`decode_test`), write `predictions` (a file name) into the run directory and return the
    test metrics."""
    if lora_settings(model) is not None:
        merge_lora(model)
    outputs = decode_test(model, tokenizer, test, cfg, device)
    rundir.write_atomic(Path(run_dir) / predictions, "".join(p + "\n" for p in outputs))
    return score(cfg.task.metrics, [list(t.references) for t in test], outputs, seen_flags(test))


def score_base(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    test: list[TestSource],
    cfg: TrainConfig,
    run_dir: Path,
    device: torch.device,
) -> dict:
    """The base model's test scores, before any training: decoded exactly as the trained
    model will be (`decode_test`), outputs into `base_predictions.txt`.

    Scored with the metrics that need no Java (BLEU and NIST for E2E, BLEU otherwise): the
    JVM of METEOR and the PTB tokenizer costs about 10 CPU seconds a scoring, and BLEU is the
    number that shows what training added."""
    try:
        from lora_repro import metrics
    except ImportError:  # a bare GPU machine: score() warns about the trained model's scores
        return {}
    outputs = decode_test(model, tokenizer, test, cfg, device)
    rundir.write_atomic(Path(run_dir) / rundir.BASE_PREDICTIONS, "".join(p + "\n" for p in outputs))
    references = [list(t.references) for t in test]
    if cfg.task.metrics == "e2e":
        return metrics.score_e2e(references, outputs, ["BLEU", "NIST"])
    return metrics.score_bleu_meteor(references, outputs, ["BLEU"])
