"""Packed training: the jobs of a sweep that differ only in rank and targets, trained as one.

    python -m lora_repro.train -m rank=1,2,4,8,64 targets=qv,qkvo hydra.launcher.pack=10

Jobs alone, even side by side on one GPU, each run their own chain of ~1,000 small kernels
per step (bench/RESULTS.md, "Step profile"). `train_pack` trains K jobs through one frozen
base instead (`lora_repro.lora.packed`): one (K x batch, T) batch, job k on the k-th copy of
the batch, one backward, one AdamW. On one H200 the 10 jobs of the mission sweep stepped in
34.4 ms together, against 7.0 ms for one job alone (bench/RESULTS.md, "Packed step").

Each job still gets what `trainer.train` writes: its run directory and config, its
metrics.jsonl (and W&B run), its checkpoints in the format of a job alone (so an interrupted
job resumes in the same pack, or alone), its adapter, predictions and summary.json (with
"pack": the jobs it trained with). A job's tokens/s are its own tokens; the pack trained K
times as many.

Which jobs pack (`pack_key`): LoRA jobs whose configs are equal but for rank and targets
(one seed, so one base, one batch order and one draw of the LoRA init seed), with
grad_accum=1, max_grad_norm=0 (clipping would have to be per job) and eval.base=false. Any
other job trains alone. A packed job's adapter equals the one it gets alone up to float
rounding (other matmul shapes), and for dropout > 0 up to its draws (one mask for the packed
batch); so a packed sweep is opt-in (`hydra.launcher.pack`, default 1).

After training, the jobs are saved and decoded one after another (`packed.unpack`).

The loop is `trainer._train`'s for K jobs, sharing its pieces (setup, schedule, validation,
the end of a run). It stays a loop of its own: `_train` also serves full fine-tuning,
gradient accumulation and clipping, which a pack does not take.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lora_repro import fastpath, rundir
from lora_repro.config import TrainConfig, check_positions
from lora_repro.data import length_grouped_batches
from lora_repro.errors import UserError
from lora_repro.lora.packed import (
    PackedJob,
    apply_packed_lora,
    job_losses,
    job_state,
    load_job_states,
    unpack,
)
from lora_repro.modeling import base_fingerprint, load_model
from lora_repro.tracking import Tracker
from lora_repro.trainer import (
    TimeBudget,
    _optimizer,
    _rng_state,
    _set_rng_state,
    finish_run,
    lm_loss,
    lr_schedule,
    run_setup,
    train,
    validation_losses,
    write_run_config,
)

PACKS_NEED = "method=lora, grad_accum=1, max_grad_norm=0, eval.base=false"


def pack_key(cfg: TrainConfig) -> str | None:
    """Jobs with equal keys can train as one pack; None: this job trains alone (a pack
    needs `PACKS_NEED`)."""
    if cfg.method != "lora" or cfg.grad_accum != 1 or cfg.max_grad_norm > 0 or cfg.eval.base:
        return None
    config = asdict(cfg)
    del config["rank"], config["targets"]
    return json.dumps(config, sort_keys=True, default=str)


def pack_loss(model, input_ids, labels, label_smoothing=0.0, jobs=1, vocab_multiple=1):
    """(K,) each packed job's mean loss over its own rows (`lm_loss`'s arguments)."""
    tokens = lm_loss(model, input_ids, labels, label_smoothing, reduction="none",
                     vocab_multiple=vocab_multiple)
    return job_losses(tokens, labels, jobs)


def train_pack(cfgs: list[TrainConfig], run_dirs: list[Path]) -> list[dict]:
    """Train the jobs `cfgs` (equal `pack_key`s) in `run_dirs` as one pack, or resume them;
    return their summaries. A complete job is skipped; jobs whose checkpoints are at
    different steps (one resumed alone meanwhile) train alone. Holds every directory
    (`rundir.hold`) throughout."""
    run_dirs = [Path(d) for d in run_dirs]
    if len({pack_key(cfg) for cfg in cfgs} - {None}) != 1 or None in map(pack_key, cfgs):
        raise ValueError("train_pack: the jobs differ in more than rank and targets")
    with contextlib.ExitStack() as held:
        try:
            for run_dir in run_dirs:
                held.enter_context(rundir.hold(run_dir))
            return _train_pack(cfgs, run_dirs)
        except BaseException:
            for run_dir in run_dirs:
                rundir.remove_if_empty(run_dir)
            raise


def _train_pack(cfgs: list[TrainConfig], run_dirs: list[Path]) -> list[dict]:
    """`train_pack`'s body, run while the directories are held: which jobs are done, which
    pack, which resume alone."""
    summaries: dict[int, dict] = {}
    todo = [i for i, d in enumerate(run_dirs) if not (d / rundir.SUMMARY).is_file()]
    for i in sorted(set(range(len(cfgs))) - set(todo)):
        summaries[i] = train(cfgs[i], run_dirs[i])  # checks it, says it is complete
    ckpts = [rundir.load_checkpoint(run_dirs[i] / rundir.CHECKPOINT) for i in todo]
    if len({c["step"] if c else None for c in ckpts}) > 1:
        print(f"{', '.join(run_dirs[i].name for i in todo)}: checkpoints at different steps; "
              "each resumes alone")
        todo_alone, todo = todo, []
    else:
        todo_alone = todo if len(todo) == 1 else []
    for i in todo_alone:
        summaries[i] = train(cfgs[i], run_dirs[i])
    if len(todo) > 1:
        cfgs_k, dirs_k = [cfgs[i] for i in todo], [run_dirs[i] for i in todo]
        for cfg, run_dir, ckpt in zip(cfgs_k, dirs_k, ckpts, strict=True):
            if ckpt is not None:
                rundir.check_same_run(run_dir, ckpt["identity"], cfg)
        for i, summary in zip(todo, _train_packed(cfgs_k, dirs_k, ckpts), strict=True):
            summaries[i] = summary
    return [summaries[i] for i in range(len(cfgs))]


def _train_packed(cfgs: list[TrainConfig], run_dirs: list[Path], ckpts: list) -> list[dict]:
    """The training loop of `trainer._train` for K jobs at once (every job's checkpoint at
    the same step, or none)."""
    cfg, k_jobs = cfgs[0], len(cfgs)  # equal but for rank and targets
    t_start, started_at, warmup_s, first_step_at = time.perf_counter(), time.time(), None, None
    device, autocast, (tokenizer, train_set, valid_set, test) = run_setup(cfg)
    lengths = [len(x["input_ids"]) for x in train_set]
    pad_id = tokenizer.pad_token_id
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, tokenizer)
    check_positions(cfg, model.config.n_positions)
    base_id = base_fingerprint(model)
    base_seed = int(torch.randint(2**62, ()))  # the draw `apply_lora` makes for a job alone
    jobs = [PackedJob(c.targets, c.rank, c.alpha, base_seed) for c in cfgs]
    apply_packed_lora(model, jobs, cfg.dropout)
    for c, run_dir in zip(cfgs, run_dirs, strict=True):
        write_run_config(c, run_dir, tokenizer)
    model.to(device).train()
    optimizer = _optimizer(model, cfg, device)
    schedule, scheduler = lr_schedule(cfg, optimizer, len(train_set))
    total_steps = schedule.total
    fast = cfg.compile if cfg.compile is not None else device.type == "cuda"
    loss_fn = partial(pack_loss, jobs=k_jobs)
    if fast:
        loss_fn = fastpath.compile_loss(
            partial(loss_fn, vocab_multiple=fastpath.VOCAB_MULTIPLE))
    max_length = cfg.task.block_size if cfg.task.name == "corpus" else cfg.task.max_length
    # examples per validation batch: each is repeated for the K jobs, so the rows (and the
    # (rows, T, vocab) logits) stay those of a job alone
    val_batch = max(1, cfg.eval.batch_size // k_jobs)
    buckets = fastpath.length_buckets(max_length) if fast else None

    epoch, batch_index, step, tokens_total, train_time = 0, 0, 0, 0, 0.0
    val_losses, val_step = [float("nan")] * k_jobs, -1
    first = ckpts[0]
    if first is not None:
        load_job_states(model, optimizer, [(c["trainable"], c["optimizer"]) for c in ckpts])
        scheduler.load_state_dict(first["scheduler"])
        epoch, batch_index, step = first["epoch"], first["batch_index"], first["step"]
        tokens_total, train_time = first["tokens_total"], first["train_time"]
        val_losses, val_step = [c["val_loss"] for c in ckpts], first["val_step"]
        total_steps = schedule.total
        _set_rng_state(first["rng"])
        print(f"resuming the pack of {k_jobs} at epoch {epoch}, step {step}")
    compile_s = None
    if fast:
        t_compile = time.perf_counter()
        shapes = [(k_jobs * rows, length)
                  for rows, length in fastpath.batch_shapes(lengths, cfg.batch_size, buckets)]
        fastpath.warm_up(loss_fn, model, shapes, autocast, cfg.label_smoothing)
        compile_s = time.perf_counter() - t_compile
    trackers = [Tracker(d, c.logger.wandb, asdict(c), group=c.name,
                        resume_step=step if first is not None else None)
                for c, d in zip(cfgs, run_dirs, strict=True)]

    def checkpoint() -> None:
        for k, (c, run_dir) in enumerate(zip(cfgs, run_dirs, strict=True)):
            trainable, opt_state = job_state(model, optimizer, k)
            rundir.save_checkpoint(run_dir / rundir.CHECKPOINT, {
                "identity": rundir.identity(c), "trainable": trainable, "optimizer": opt_state,
                "scheduler": scheduler.state_dict(), "epoch": epoch,
                "batch_index": batch_index, "step": step, "rng": _rng_state(),
                "tokens_total": tokens_total, "train_time": train_time,
                "val_loss": val_losses[k], "val_step": val_step,
                "loss_window": {"loss_sum": loss_sum[k].item(), "steps": steps_logged,
                                "tokens": tokens, "elapsed": time.perf_counter() - t_log},
            })

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=total_steps, initial=step, desc=f"pack of {k_jobs}", unit="step",
               mininterval=1)
    loss_sum = torch.zeros(k_jobs, device=device)
    tokens, steps_logged, t_log = 0, 0, time.perf_counter()
    if first is not None and "loss_window" in first:
        for k, c in enumerate(ckpts):
            loss_sum[k] = c["loss_window"]["loss_sum"]
        tokens, steps_logged = first["loss_window"]["tokens"], first["loss_window"]["steps"]
        t_log -= first["loss_window"]["elapsed"]
    budget = TimeBudget(cfg.max_time_min, step, device)
    while epoch < cfg.epochs and step < total_steps:
        batches = length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        while batch_index < len(batches) and step < total_steps:
            features = [train_set[i] for i in batches[batch_index]]
            batch = fastpath.static_batch(features, pad_id, cfg.batch_size, buckets)
            n_tokens = sum(len(f["input_ids"]) for f in features)
            tokens, tokens_total = tokens + n_tokens, tokens_total + n_tokens
            ids, labels = (batch[key].repeat(k_jobs, 1).to(device, non_blocking=True)
                           for key in ("input_ids", "labels"))
            if fast:
                fastpath.step_begin()
            with autocast():
                losses = loss_fn(model, ids, labels, cfg.label_smoothing)  # (K,)
            losses.sum().backward()
            loss_sum += losses.detach()
            batch_index += 1
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_logged += 1
            bar.update()
            if warmup_s is None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                warmup_s, first_step_at = time.perf_counter() - t_start, time.time()
            fitted = budget.fits(step, total_steps)
            if fitted != total_steps:
                total_steps = schedule.total = bar.total = fitted
            if step % cfg.logger.every == 0 or step == total_steps:
                train_losses = (loss_sum / steps_logged).tolist()  # waits for the GPU
                elapsed = time.perf_counter() - t_log
                for tracker, train_loss in zip(trackers, train_losses, strict=True):
                    tracker.log({"train_loss": train_loss, "lr": scheduler.get_last_lr()[0],
                                 "tokens_per_s": tokens / elapsed,
                                 "epoch": round(epoch + batch_index / len(batches), 4)}, step)
                bad = [d.name for d, x in zip(run_dirs, train_losses, strict=True)
                       if not math.isfinite(x)]
                if bad:
                    raise UserError(f"training diverged ({', '.join(bad)}) by step {step} "
                                    f"(lr={cfg.lr}); lower lr and start a new run")
                bar.set_postfix(loss=f"{min(train_losses):.3f}-{max(train_losses):.3f}",
                                tok_s=f"{k_jobs * tokens / elapsed:.0f}")
                train_time += elapsed
                loss_sum.zero_()
                tokens, steps_logged, t_log = 0, 0, time.perf_counter()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint()
        if batch_index >= len(batches):
            epoch, batch_index = epoch + 1, 0
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_val = time.perf_counter()
            val_losses = validation_losses(model, valid_set, val_batch, pad_id, device,
                                           autocast, k_jobs)
            for tracker, val_loss in zip(trackers, val_losses, strict=True):
                tracker.log({"val_loss": val_loss, "epoch": epoch}, step)
            val_step = step
            t_log += time.perf_counter() - t_val
            checkpoint()
    bar.close()
    if val_step != step:
        val_losses = validation_losses(model, valid_set, val_batch, pad_id, device, autocast,
                                       k_jobs)
        for tracker, val_loss in zip(trackers, val_losses, strict=True):
            tracker.log({"val_loss": val_loss, "epoch": epoch}, step)

    record = {"base_fingerprint": base_id, "base_metrics": None, "steps": step,
              "train_examples": len(train_set), "train_tokens": tokens_total,
              "train_tokens_per_s": tokens_total / train_time if train_time else None,
              "warmup_s": warmup_s, "compile_s": compile_s, "started_at": started_at,
              "first_step_at": first_step_at, "pack": [d.name for d in run_dirs]}
    return [finish_run(c, run_dir, single, tokenizer, test, device, tracker, val_loss,
                       record, t_start)
            for c, run_dir, single, tracker, val_loss in zip(
                cfgs, run_dirs, unpack(model, cfg.dropout), trackers, val_losses, strict=True)]
