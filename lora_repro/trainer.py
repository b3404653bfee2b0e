"""The training loop: plain PyTorch, read top to bottom.

`train(cfg, run_dir)` builds tokenizer, data and model, fine-tunes (LoRA or full), checkpoints
each epoch (and every `checkpoint_every` steps), resumes from `checkpoints/last.pt` when the
same command is rerun in the same run directory, saves the adapter, decodes and scores the
test set, and writes `summary.json` last.
"""

from __future__ import annotations

import math
import os
import random
import socket
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lora_repro import fastpath, rundir
from lora_repro.config import TaskConfig, TrainConfig, check_positions
from lora_repro.data import (
    TaskData,
    collate,
    encode_dataset,
    length_grouped_batches,
    load_task,
    prompt_text,
)
from lora_repro.data.corpus import Blocks, load_corpus
from lora_repro.data.encoding import IGNORE_INDEX
from lora_repro.data.tasks import TASKS, default_options
from lora_repro.errors import UserError
from lora_repro.lora import apply_lora, count_trainable, save_adapter
from lora_repro.modeling import autocast as autocast_for
from lora_repro.modeling import (
    base_fingerprint,
    load_model,
    load_tokenizer,
    resolve_device,
    train_bpe,
)
from lora_repro.synthetic_base import synthetic_base
from lora_repro.tracking import Tracker


def task_data(task: TaskConfig) -> TaskData:
    """Load the task with the options of `task` that this task accepts."""
    keys = default_options(task.name) if task.name in TASKS else {}
    options = {k: getattr(task, k) for k in keys}
    return load_task(task.name, data_dir=task.data_dir, seed=task.seed, **options)


def load_data(cfg: TrainConfig):
    """(tokenizer, train set, valid set, test sources). Example tasks are encoded as
    `{"input_ids", "labels"}` dicts; the corpus task gives packed blocks that read the same.
    `UserError` when nothing is left to train on (before any run directory is written)."""
    if cfg.task.name == "corpus":
        if cfg.model.tokenizer == "bpe":
            raise UserError("model.tokenizer=bpe trains on example tasks; give a GPT-2 tokenizer")
        tokenizer = load_tokenizer(cfg.model.tokenizer)
        cache = Path(cfg.task.cache_dir).expanduser() if cfg.task.cache_dir else None
        train, valid = load_corpus(cfg.task.paths, tokenizer, cfg.task.block_size,
                                   cfg.task.valid_fraction, cfg.task.seed, cache)
        train_set, valid_set, test = Blocks(train), Blocks(valid), []
    else:
        # No test split when nothing is decoded: E2E's paper references cost a spaCy pass.
        data = task_data(cfg.task if cfg.eval.test else replace(cfg.task, test_file=None))
        tokenizer = run_tokenizer(cfg, data)
        fmt = cfg.task.prompt_format
        train_set = encode_dataset(tokenizer, data.train, cfg.task.max_length, fmt)
        valid_set = encode_dataset(tokenizer, data.valid, cfg.task.max_length, fmt)
        test = data.test
    if len(train_set) == 0:  # a run of 0 steps would look complete but have learned nothing
        raise UserError(f"task {cfg.task.name!r}: no training examples (task.data_dir="
                        f"{cfg.task.data_dir!r}); give a train split that holds examples")
    return tokenizer, train_set, valid_set, test


class Schedule:
    """The learning-rate factor: linear warm-up, then linear (the paper) or cosine decay to 0
    at step `total`. A callable object, so `LambdaLR` saves `total` in its state_dict."""

    def __init__(self, warmup: int, total: int, kind: str):
        self.warmup, self.total, self.kind = warmup, total, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def run_tokenizer(cfg: TrainConfig, data: TaskData):
    """The run's tokenizer; a "bpe" one (trained on the task, or the synthetic base's own,
    trained on its pretraining text), which `train` saves to `run_dir/tokenizer`."""
    if cfg.model.tokenizer != "bpe":
        return load_tokenizer(cfg.model.tokenizer)
    if cfg.model.init == "synthetic":
        return load_tokenizer(str(synthetic_base(cfg.model)))
    texts = [prompt_text(ex.source, cfg.task.prompt_format) + " " + ex.target
             for ex in data.train]
    return train_bpe(texts, cfg.model.vocab_size)


class TimeBudget:
    """Fit the run into `minutes` of wall time: after a probe of 30 steps past compilation
    and warm-up, shrink the total step count (and so the lr schedule) to what fits."""

    PROBE = (20, 50)  # steps after the start of this process's loop

    def __init__(self, minutes: float | None, start_step: int, device: torch.device):
        self.minutes, self.start, self.device = minutes, start_step, device
        self.t0 = time.perf_counter()
        self.t_probe = None

    def fits(self, step: int, total: int) -> int:
        if self.minutes is None or step - self.start not in self.PROBE:
            return total
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if step - self.start == self.PROBE[0]:
            self.t_probe = now
            return total
        per_step = (now - self.t_probe) / (self.PROBE[1] - self.PROBE[0])
        left = self.minutes * 60 - (now - self.t0)
        return min(total, step + max(0, int(left / per_step)))


def lm_logits(lm_head: nn.Linear, hidden: torch.Tensor, vocab_multiple: int = 1) -> torch.Tensor:
    """(B, T, V) logits of hidden states (B, T, d). With `vocab_multiple` > 1 the head's
    (V, d) weight gets zero rows up to a multiple of it and the logits are sliced back to V:
    the same values, but GPT-2's V = 50,257 (odd) otherwise forces the GPU onto unaligned
    GEMM kernels (the fast path: `fastpath.VOCAB_MULTIPLE`, bench/RESULTS.md)."""
    vocab = lm_head.weight.shape[0]
    pad = -vocab % vocab_multiple
    if pad == 0:
        return lm_head(hidden)
    bias = None if lm_head.bias is None else F.pad(lm_head.bias, (0, pad))
    return F.linear(hidden, F.pad(lm_head.weight, (0, 0, 0, pad)), bias)[..., :vocab]


def lm_loss(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
    label_smoothing: float = 0.0, reduction: str = "mean", vocab_multiple: int = 1,
) -> torch.Tensor:
    """Next-token cross-entropy over target tokens (labels != -100).

    input_ids, labels: (B, T), right-padded. No attention mask is passed: with padding on
    the right, causal attention never lets a real token see a pad, and pads carry label
    -100, so the mask would change nothing but cost a mask build and the fused kernels.
    `vocab_multiple`: see `lm_logits`.
    """
    hidden = model.transformer(input_ids=input_ids).last_hidden_state  # (B, T, d)
    # (B, T-1, V): position t predicts token t+1
    logits = lm_logits(model.lm_head, hidden[:, :-1], vocab_multiple)
    return F.cross_entropy(
        logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing, reduction=reduction,
    )


def validation_loss(model, encoded, batch_size, pad_id, device, autocast) -> float:
    """Mean token NLL (no label smoothing) over a validation set, batched by length."""
    return validation_losses(model, encoded, batch_size, pad_id, device, autocast)[0]


@torch.no_grad()
def validation_losses(model, encoded, batch_size, pad_id, device, autocast,
                      jobs: int = 1) -> list[float]:
    """`validation_loss` of each of the `jobs` packed in `model` (`lora_repro.lora.packed`):
    every batch is repeated once per job, job k on the k-th copy of its rows."""
    if not encoded:
        return [float("nan")] * jobs
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    total = torch.zeros(jobs, device=device, dtype=torch.float64)
    count = 0
    for start in range(0, len(order), batch_size):
        batch = collate([encoded[i] for i in order[start:start + batch_size]], pad_id)
        ids, labels = (batch[key].to(device).repeat(jobs, 1) for key in ("input_ids", "labels"))
        with autocast():
            losses = lm_loss(model, ids, labels, reduction="none")  # (jobs * B * (T-1),)
        total += losses.reshape(jobs, -1).sum(1).double()
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    model.train()
    return (total / max(count, 1)).tolist()


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW as the paper's code (betas 0.9 / adam_beta2); biases and LayerNorms get no decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), eps=1e-6,
                             fused=device.type == "cuda")


def run_setup(cfg: TrainConfig):
    """(device, its autocast, `load_data`'s (tokenizer, train, valid, test)) of a run. Once
    its data loaded, a run that will score its test outputs starts the scorer's METEOR, to
    load while the run trains."""
    device = resolve_device(cfg.device)
    autocast = autocast_for(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_data(cfg)
    if cfg.eval.test:
        from lora_repro.decoding import start_scoring
        start_scoring(cfg.task.metrics)
    return device, autocast, data


def write_run_config(cfg: TrainConfig, run_dir: Path, tokenizer) -> None:
    """The run directory's first files: its config, and a "bpe" tokenizer trained here."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_json(run_dir / rundir.CONFIG, asdict(cfg))
    if cfg.model.tokenizer == "bpe":
        tokenizer.save_pretrained(run_dir / rundir.TOKENIZER)


def lr_schedule(cfg: TrainConfig, optimizer, n_examples: int):
    """(`Schedule`, its `LambdaLR`) over the run's optimizer steps: `epochs` passes over
    `n_examples` in batches of `batch_size`, `grad_accum` batches a step, capped at
    `max_steps`."""
    steps_per_epoch = math.ceil(math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    schedule = Schedule(cfg.warmup_steps, total_steps, cfg.lr_schedule)
    return schedule, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def train(cfg: TrainConfig, run_dir: Path) -> dict:
    """Run (or resume, or skip if complete) one training job in `run_dir`; return its summary.
    The process holds `run_dir` throughout (`rundir.hold`): a second one gets a UserError."""
    try:
        with rundir.hold(run_dir):
            return _train(cfg, Path(run_dir))
    except BaseException:
        rundir.remove_if_empty(run_dir)  # refused before writing: no directory left behind
        raise


def _train(cfg: TrainConfig, run_dir: Path) -> dict:
    """`train`'s body, run while the directory is held."""
    summary_path = run_dir / rundir.SUMMARY
    if summary_path.is_file():
        summary = rundir.read_json(summary_path)
        rundir.check_same_run(run_dir, summary["identity"], cfg)
        rundir.verify_artifacts(run_dir, summary)
        print(f"{run_dir} is complete (summary.json); nothing to do")
        if cfg.eval.test and not (run_dir / rundir.PREDICTIONS).is_file():
            print(f"its test set was not decoded: python -m lora_repro.evaluate decode "
                  f"run={run_dir}")
        return summary
    ckpt = rundir.load_checkpoint(run_dir / rundir.CHECKPOINT)
    if ckpt is not None:
        rundir.check_same_run(run_dir, ckpt["identity"], cfg)
    t_start, started_at, warmup_s, first_step_at = time.perf_counter(), time.time(), None, None
    # Data, then the model, before the run directory is written: a refused run leaves nothing.
    device, autocast, (tokenizer, train_set, valid_set, test) = run_setup(cfg)
    lengths = [len(x["input_ids"]) for x in train_set]
    pad_id = tokenizer.pad_token_id
    max_length = cfg.task.block_size if cfg.task.name == "corpus" else cfg.task.max_length

    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, tokenizer)
    check_positions(cfg, model.config.n_positions)  # a pretrained model's own
    base_id = base_fingerprint(model)
    base_metrics = None
    if cfg.eval.base and cfg.eval.test and test:  # where training starts, decoded as at its end
        from lora_repro.decoding import score_base

        base_metrics = score_base(model.to(device), tokenizer, test, cfg, run_dir, device)
    if cfg.method == "lora":
        apply_lora(model, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout)
    else:
        model.requires_grad_(True)  # full fine-tuning (or pretraining): every parameter
    write_run_config(cfg, run_dir, tokenizer)
    model.to(device).train()
    optimizer = _optimizer(model, cfg, device)
    schedule, scheduler = lr_schedule(cfg, optimizer, len(train_set))
    total_steps = schedule.total
    fast = cfg.compile if cfg.compile is not None else device.type == "cuda"
    loss_fn = lm_loss
    if fast:  # compiled, and the LM head's vocabulary padded to aligned GEMMs
        loss_fn = fastpath.compile_loss(partial(lm_loss, vocab_multiple=fastpath.VOCAB_MULTIPLE))
    buckets = fastpath.length_buckets(max_length) if fast else None

    epoch, batch_index, step = 0, 0, 0
    tokens_total, train_time = 0, 0.0  # over the whole run, resumes included
    val_loss, val_step = float("nan"), -1
    if ckpt is not None:
        model.load_state_dict(ckpt["trainable"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        epoch, batch_index, step = ckpt["epoch"], ckpt["batch_index"], ckpt["step"]
        tokens_total, train_time = ckpt.get("tokens_total", 0), ckpt.get("train_time", 0.0)
        val_loss, val_step = ckpt.get("val_loss", val_loss), ckpt.get("val_step", val_step)
        total_steps = schedule.total  # restored with the scheduler (a time budget may set it)
        _set_rng_state(ckpt["rng"])
        print(f"resuming {run_dir} at epoch {epoch}, step {step}")
    compile_s = None
    if fast:  # compile and record every batch shape now, not in the middle of training
        t_compile = time.perf_counter()
        fastpath.warm_up(loss_fn, model, fastpath.batch_shapes(lengths, cfg.batch_size, buckets),
                         autocast, cfg.label_smoothing)
        compile_s = time.perf_counter() - t_compile
    tracker = Tracker(run_dir, cfg.logger.wandb, asdict(cfg), group=cfg.name,
                      resume_step=step if ckpt is not None else None)

    def checkpoint() -> None:
        rundir.save_checkpoint(run_dir / rundir.CHECKPOINT, {
            "identity": rundir.identity(cfg), "trainable": _trainable_state(model),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "batch_index": batch_index, "step": step, "rng": _rng_state(),
            "tokens_total": tokens_total, "train_time": train_time,
            "val_loss": val_loss, "val_step": val_step,
            # the running window of the next log line, so a resumed run logs what the
            # uninterrupted one does (its timing aside)
            "loss_window": {"loss_sum": loss_sum.item(), "steps": steps_logged,
                            "tokens": tokens, "elapsed": time.perf_counter() - t_log},
        })

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=total_steps, initial=step, desc=run_dir.name, unit="step", mininterval=1)
    loss_sum = torch.zeros((), device=device)  # summed on device: no host sync per step
    tokens, steps_logged, t_log = 0, 0, time.perf_counter()  # since the last log line
    if ckpt is not None and "loss_window" in ckpt:
        window = ckpt["loss_window"]
        loss_sum.fill_(window["loss_sum"])
        tokens, steps_logged = window["tokens"], window["steps"]
        t_log -= window["elapsed"]
    budget = TimeBudget(cfg.max_time_min, step, device)
    while epoch < cfg.epochs and step < total_steps:
        batches = length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        while batch_index < len(batches) and step < total_steps:
            if batch_index % cfg.grad_accum == 0:  # a new group; an epoch's last may be short
                group = min(cfg.grad_accum, len(batches) - batch_index)
            features = [train_set[i] for i in batches[batch_index]]
            batch = fastpath.static_batch(features, pad_id, cfg.batch_size, buckets)
            n_tokens = sum(len(f["input_ids"]) for f in features)
            tokens, tokens_total = tokens + n_tokens, tokens_total + n_tokens
            if fast:
                fastpath.step_begin()
            with autocast():
                loss = loss_fn(model, batch["input_ids"].to(device, non_blocking=True),
                               batch["labels"].to(device, non_blocking=True),
                               cfg.label_smoothing)
            (loss / group).backward()
            loss_sum += loss.detach() / group
            batch_index += 1
            if batch_index % cfg.grad_accum and batch_index < len(batches):
                continue  # accumulate more micro-batches
            if cfg.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_logged += 1
            bar.update()
            if warmup_s is None:  # this process's time to its first step: loading, compiling
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                warmup_s, first_step_at = time.perf_counter() - t_start, time.time()
            fitted = budget.fits(step, total_steps)
            if fitted != total_steps:  # the time budget shortens the run and its schedule
                total_steps = schedule.total = bar.total = fitted
            if step % cfg.logger.every == 0 or step == total_steps:
                # .item() waits for the GPU to finish the steps queued so far: read the clock
                # after it, or tokens/s counts how fast steps were queued, not trained (several
                # times too high when jobs share a GPU)
                train_loss = loss_sum.item() / steps_logged
                elapsed = time.perf_counter() - t_log
                metrics = {"train_loss": train_loss,
                           "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / elapsed,
                           "epoch": round(epoch + batch_index / len(batches), 4)}  # epochs done
                if not math.isfinite(metrics["train_loss"]):
                    raise UserError(f"training diverged: train_loss {metrics['train_loss']} by "
                                    f"step {step} (lr={cfg.lr}); lower lr and start a new run")
                tracker.log(metrics, step)
                bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
                train_time += elapsed
                loss_sum.zero_()
                tokens, steps_logged, t_log = 0, 0, time.perf_counter()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint()
        if batch_index >= len(batches):
            epoch, batch_index = epoch + 1, 0
            if device.type == "cuda":  # the queued training steps are not validation time
                torch.cuda.synchronize(device)
            t_val = time.perf_counter()
            val_loss = validation_loss(model, valid_set, cfg.eval.batch_size, pad_id, device,
                                       autocast)
            tracker.log({"val_loss": val_loss, "epoch": epoch}, step)
            val_step = step
            t_log += time.perf_counter() - t_val  # keep validation out of tokens/s
            checkpoint()
    bar.close()
    if val_step != step:  # stopped by max_steps inside an epoch, or resumed after the last
        val_loss = validation_loss(model, valid_set, cfg.eval.batch_size, pad_id, device, autocast)
        tracker.log({"val_loss": val_loss, "epoch": epoch}, step)

    record = {"base_fingerprint": base_id, "base_metrics": base_metrics, "steps": step,
              "train_examples": len(train_set), "train_tokens": tokens_total,
              "train_tokens_per_s": tokens_total / train_time if train_time else None,
              "warmup_s": warmup_s, "compile_s": compile_s, "started_at": started_at,
              "first_step_at": first_step_at}
    return finish_run(cfg, run_dir, model, tokenizer, test, device, tracker, val_loss,
                      record, t_start)


def finish_run(cfg: TrainConfig, run_dir: Path, model: nn.Module, tokenizer, test,
               device: torch.device, tracker: Tracker, val_loss: float, record: dict,
               t_start: float) -> dict:
    """A trained job's end: save the adapter (or the model), decode and score the test set,
    write `summary.json` last (`record`: the training's counts and times, as they go into
    it) and return it."""
    model.eval()
    if cfg.method == "lora":
        save_adapter(model, run_dir / rundir.ADAPTER)
    else:  # a Hugging Face directory, usable as model.name=<run_dir>/model
        model.save_pretrained(run_dir / rundir.MODEL)
        tokenizer.save_pretrained(run_dir / rundir.MODEL)
    metrics = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
    if cfg.eval.test and test:
        from lora_repro.decoding import decode_and_score  # imports the metrics only if needed

        metrics.update(decode_and_score(model, tokenizer, test, cfg, run_dir, device))
    summary = {
        "identity": rundir.identity(cfg),
        "config": asdict(cfg),
        "metrics": metrics,
        "trainable_params": count_trainable(model),
        "total_params": sum(p.numel() for p in model.parameters()),
        # base_fingerprint, base_metrics, steps, train_examples, train_tokens,
        # train_tokens_per_s, warmup_s, compile_s, started_at, first_step_at (and a pack's
        # "pack"); the times say when and where this process ran (the sweep launcher and
        # bench.sweep read them)
        **record,
        "wall_time_s": time.perf_counter() - t_start,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "git_commit": rundir.git_commit(),
        "ended_at": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "mps": "CUDA_MPS_PIPE_DIRECTORY" in os.environ,  # under an MPS server (the launcher's)
        "versions": {"torch": torch.__version__},
    }
    tracker.summary({**metrics, "trainable_params": summary["trainable_params"]})
    tracker.finish()
    summary["artifacts"] = rundir.checksums(run_dir)
    rundir.write_json(run_dir / rundir.SUMMARY, summary)
    return summary
