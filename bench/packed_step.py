"""Packed-step benchmark: K jobs of the mission sweep trained as one packed step.

    python -m bench.packed_step            # GPU: GPT-2 Medium shape, E2E dev batches
    python -m bench.packed_step --tiny     # CPU smoke test of the script itself
    python -m bench.packed_step --packs 10 # one K (a process of its own)
    python -m bench.packed_step --jobs qkvo8,qkvo8 --rows 16  # other jobs, 16 rows each

Alternatives to the fast path, measured on an H200 and not adopted (bench/RESULTS.md,
"Packed step"): `--label-head` (LM head on target positions only), `--attention eager`,
`--bf16-base` (frozen Conv1D weights in bf16, exact), `--bf16-model` (a bf16 residual
stream, not exact); 3% at most for the exact ones, 11.5% for all of them.

On a GPU each K is measured in a fresh process of its own: measured after another K in the
same process, a row comes out wrong (H200, 2026-12-02: K = 5 stepped in 36.9 ms after K = 2,
in 20.2 ms alone), the first row's compiled graphs and CUDA-graph memory still in place.

The mission sweep's jobs (rank=1,2,4,8,64 x targets=qv,qkvo) differ only in their adapters.
For K = 1, 2, 5 and 10 of them, one training step of all K at once through one frozen base
(`lora_repro.lora.packed`): a (K x 8, T) batch, each job's 8 rows its own (here the same
E2E batches for every job, as a sweep with one seed gives), the loss the sum of the jobs'
own mean losses, one fused AdamW; on GPU compiled, with CUDA graphs and bf16 autocast as
the trainer's fast path. Reports ms/step, real tokens/s of all K jobs together, peak
memory, the warm-up, and the projected training time of the 10-job paper sweep (26,290
steps per job) run K jobs at a time: ceil(10 / K) x 26,290 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import common
from lora_repro import fastpath
from lora_repro.data.encoding import IGNORE_INDEX
from lora_repro.lora.packed import PackedJob, apply_packed_lora
from lora_repro.packed_trainer import pack_loss
from lora_repro.trainer import lm_logits

ALPHA, DROPOUT, SMOOTH, BATCH, SWEEP = 32.0, 0.1, 0.1, 8, 10
N_BATCHES = 40  # E2E batches cycled through while timing
JOBS = [(targets, rank) for rank in (1, 2, 4, 8, 64) for targets in ("qv", "qkvo")]


def frozen_to_bf16(model: torch.nn.Module) -> None:
    """Store the frozen `Conv1D` weights and biases in bf16. Exact under bf16 autocast, which
    casts them to bf16 for every matmul anyway (the `_to_copy` kernels of the step profile);
    LayerNorms and the embeddings (tied to the LM head) stay fp32."""
    for m in model.modules():
        if type(m).__name__ == "Conv1D":
            m.to(torch.bfloat16)


def all_frozen_to_bf16(model: torch.nn.Module) -> None:
    """Store every frozen tensor in bf16, the embeddings and LayerNorms too, the adapters
    staying fp32. NOT exact: the residual stream then runs in bf16 (under autocast it is
    fp32, as the embeddings' output). Measures what the paper's numerics cost."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()


def parse_jobs(text: str) -> list[tuple[str, int]]:
    """"qv1,qkvo64" -> [("qv", 1), ("qkvo", 64)]: a job's targets, then its rank."""
    out = []
    for token in text.split(","):
        targets = token.rstrip("0123456789")
        if not targets or targets == token:
            raise argparse.ArgumentTypeError(
                f"{token!r} is not <targets><rank>, e.g. qv8 or qkvo64")
        out.append((targets, int(token[len(targets):])))
    return out


def packed_model(specs: list[tuple[str, int]], shape, tokenizer, device):
    """The frozen base with the jobs `specs` ((targets, rank) each) packed on it, job i's A
    drawn from seed i."""
    jobs = [PackedJob(t, r, ALPHA, base_seed=i) for i, (t, r) in enumerate(specs)]
    return apply_packed_lora(common.base_model(shape, tokenizer, device), jobs, DROPOUT)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """(N,) positions, flat over (rows, T), whose hidden state predicts a target token:
    position t of row i predicts labels[i, t + 1]. labels: (rows, T), IGNORE_INDEX where
    no loss."""
    hit = torch.zeros_like(labels, dtype=torch.bool)
    hit[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return hit.flatten().nonzero().squeeze(1)


def label_head_losses(lm_head, hidden, labels, positions, jobs: int, label_smoothing: float,
                      vocab_multiple: int) -> torch.Tensor:
    """(K,) each packed job's mean loss, as `pack_loss` gives it, with the LM head and the
    cross-entropy on the N target positions only (E2E: 42% of a batch's positions), not
    on every one. hidden: (rows, T, d); labels: (rows, T); positions: `target_positions`."""
    rows, length, d = hidden.shape
    logits = lm_logits(lm_head, hidden.reshape(-1, d)[positions], vocab_multiple)  # (N, V)
    tokens = F.cross_entropy(logits, labels.reshape(-1)[positions + 1],
                             label_smoothing=label_smoothing, reduction="none")  # (N,)
    job = positions // (rows // jobs * length)  # job k owns rows k * B .. (k + 1) * B - 1
    sums = tokens.new_zeros(jobs).index_add(0, job, tokens)
    counts = tokens.new_zeros(jobs).index_add(0, job, torch.ones_like(tokens))
    return sums / counts.clamp(min=1)


def label_head_loss_fn(jobs: int, compiled: bool):
    """`pack_loss`'s signature, with `label_head_losses` (+ optional target positions):
    compiled, the body (embeddings and blocks) with CUDA graphs as the fast path compiles
    its loss, the head without graphs and with every dim symbolic (N changes every batch)."""
    def body(model, input_ids):
        return model.transformer(input_ids=input_ids).last_hidden_state  # (rows, T, d)

    head = partial(label_head_losses, jobs=jobs,
                   vocab_multiple=fastpath.VOCAB_MULTIPLE if compiled else 1)
    if compiled:
        body, head = fastpath.compile_loss(body), torch.compile(head, dynamic=True)

    def loss_fn(model, input_ids, labels, label_smoothing, positions=None):
        positions = target_positions(labels) if positions is None else positions
        return head(model.lm_head, body(model, input_ids), labels, positions,
                    label_smoothing=label_smoothing)
    return loss_fn


def measure(specs: list[tuple[str, int]], shape, tokenizer, batches, device, steps: int,
            bf16_base: bool = False, label_head: bool = False, attention: str = "sdpa",
            bf16_model: bool = False) -> dict:
    """One row: the jobs `specs` ((targets, rank) each) packed, `steps` timed steps after a
    warm-up. `batches`: (batch of one job, its real tokens). `bf16_base`: `frozen_to_bf16`
    first. `label_head`: `label_head_loss_fn` in place of `pack_loss`. `attention`:
    transformers' attn_implementation (sdpa: the fast path's; eager: matmuls and a softmax,
    which inductor fuses). `bf16_model`: `all_frozen_to_bf16` first."""
    common.reset_memory(device)
    on_gpu = device.type == "cuda"
    k = len(specs)
    shape = dataclasses.replace(shape, attn_implementation=attention)
    model = packed_model(specs, shape, tokenizer, device).train()
    if bf16_base and on_gpu:
        frozen_to_bf16(model)
    if bf16_model and on_gpu:
        all_frozen_to_bf16(model)
    packed = [({name: b[name].repeat(k, 1) for name in ("input_ids", "labels")}, k * n)
              for b, n in batches]
    if label_head:  # computed once here, as a trainer would on the host: no sync a step
        for b, _ in packed:
            b["positions"] = target_positions(b["labels"])

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu)

    t0 = time.perf_counter()
    if on_gpu:
        torch._dynamo.reset()
    loss_fn = partial(pack_loss, jobs=k)  # (K,): each job's loss, as the packed trainer's
    if label_head:
        loss_fn = label_head_loss_fn(k, on_gpu)
    elif on_gpu:
        loss_fn = fastpath.compile_loss(partial(loss_fn, vocab_multiple=fastpath.VOCAB_MULTIPLE))
    if on_gpu:
        shapes = sorted({tuple(b["input_ids"].shape) for b, _ in packed})
        fastpath.warm_up(loss_fn, model, shapes, autocast, SMOOTH)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4,
                            weight_decay=0.01, fused=on_gpu)

    def step(batch):
        if on_gpu:
            fastpath.step_begin()
        with autocast():
            extra = {"positions": batch["positions"]} if label_head else {}
            losses = loss_fn(model, batch["input_ids"], batch["labels"], SMOOTH, **extra)
        losses.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for batch, _ in packed[:3]:
        step(batch)
    common.sync(device)
    warmup_s, t1 = time.perf_counter() - t0, time.perf_counter()
    for i in range(steps):
        step(packed[i % len(packed)][0])
    common.sync(device)
    ms = 1e3 * (time.perf_counter() - t1) / steps
    tokens = sum(packed[i % len(packed)][1] for i in range(steps)) / steps
    rows = packed[0][0]["input_ids"].shape[0] // k
    return {"jobs": k, "rows": rows,
            "bf16_base": bf16_base and on_gpu, "bf16_model": bf16_model and on_gpu,
            "label_head": label_head,
            "attention": "mem-efficient" if attention == "sdpa" else attention,
            "targets_ranks": " ".join(f"{t}{r}" for t, r in specs),
            "ms_per_step": ms, "ms_per_job_step": ms / k, "tokens_per_s": tokens / (ms / 1e3),
            "peak_gib": common.peak_gib(device), "warmup_s": warmup_s,
            # the paper's batch only: other rows per job are not its steps
            "paper_sweep_min": (math.ceil(SWEEP / k) * common.PAPER_E2E_STEPS * ms / 6e4
                                if rows == BATCH else None)}


def real_share(batches: list[tuple[dict[str, torch.Tensor], int]]) -> float:
    """Real tokens over all positions of `batches` ((batch, its real tokens) each): what is
    not padding to the fast path's length buckets and to whole batches."""
    return sum(n for _, n in batches) / sum(b["input_ids"].numel() for b, _ in batches)


def variant_flags(args) -> list[str]:
    """The flags of the alternatives to the fast path that `args` asks for, as typed."""
    on = {"--bf16-base": args.bf16_base, "--bf16-model": args.bf16_model,
          "--label-head": args.label_head}
    return [f for f, yes in on.items() if yes] + (
        ["--attention", args.attention] if args.attention != "sdpa" else [])


def measure_alone(args, k: int) -> dict:
    """`measure` of the first K mission jobs in a fresh process (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        argv = ["--data-dir", args.data_dir, "--tokenizer", args.tokenizer, "--packs", str(k),
                "--rows", str(args.rows), "--out", str(out), *variant_flags(args),
                *(["--tiny"] if args.tiny else [])]
        subprocess.run([sys.executable, "-m", "bench.packed_step", *argv], check=True,
                       cwd=common.HERE.parent)
        return json.loads(out.read_text())["tables"][0]["rows"][0]


def main(argv=None) -> dict:
    parser = common.arguments(__doc__.splitlines()[0])
    parser.add_argument("--packs", default=None,
                        help="the K values, in this order (default 1,2,5,10; --tiny: 1,2)")
    parser.add_argument("--jobs", default=None, type=parse_jobs,
                        help="one pack of these jobs instead, e.g. qv1,qkvo64 (targets, rank)")
    parser.add_argument("--rows", type=int, default=BATCH, help="batch rows per job")
    parser.add_argument("--bf16-base", action="store_true",
                        help="frozen Conv1D weights stored in bf16 (exact under autocast)")
    parser.add_argument("--bf16-model", action="store_true",
                        help="every frozen tensor in bf16, a bf16 residual stream (NOT exact)")
    parser.add_argument("--label-head", action="store_true",
                        help="LM head and cross-entropy on the target positions only")
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                        help="transformers' attn_implementation (default sdpa, the fast path's)")
    args = parser.parse_args(argv)
    tokenizer, shape, encoded, _, device = common.setup(args)
    steps = 2 if args.tiny else 100
    packs = ([int(k) for k in args.packs.split(",")] if args.packs
             else [1, 2] if args.tiny else [1, 2, 5, 10])
    specs = [args.jobs] if args.jobs else [JOBS[:k] for k in packs]
    # on CPU: no CUDA context in this process beside the children of `measure_alone`
    cpu_batches = common.static_batches(encoded, tokenizer.pad_token_id, args.rows, N_BATCHES,
                                        torch.device("cpu"))
    share = real_share(cpu_batches)
    if device.type == "cuda" and len(specs) > 1:
        rows = [measure_alone(args, k) for k in packs]
    else:
        on_device = [({k: v.to(device) for k, v in b.items()}, n) for b, n in cpu_batches]
        rows = [measure(s, shape, tokenizer, on_device, device, steps, bf16_base=args.bf16_base,
                        label_head=args.label_head, attention=args.attention,
                        bf16_model=args.bf16_model) for s in specs]
    one = next((r for r in rows if r["jobs"] == 1), None)
    for row in rows:
        row["vs_one"] = row["tokens_per_s"] / one["tokens_per_s"] if one else None
    notes = [
        f"LoRA alpha {ALPHA:g}, dropout {DROPOUT}, label smoothing {SMOOTH}, batch {args.rows} "
        f"per job, {N_BATCHES} length-grouped E2E batches (the fast path's buckets), {steps} "
        "timed steps after a warm-up. Jobs: the first K of the mission sweep, or --jobs "
        "(targets and rank per job). Tokens/s: real (non-pad) tokens of all K jobs per "
        "second. x one: tokens/s against K = 1. Paper sweep: training time of the 10 jobs "
        "at 26,290 steps each, K at a time, compilation not included.",
        f"Real tokens are {share:.1%} of these batches' positions (the rest pads rows to the "
        f"fast path's length buckets): a step without padding would compute {1 - share:.1%} "
        "fewer positions.",
    ]
    columns = [("jobs", "K jobs packed", "d"), ("targets_ranks", "jobs (targets, rank)", "s"),
               ("rows", "rows per job", "d"), ("bf16_base", "bf16 base", ""),
               ("ms_per_step", "ms/step", ".2f"), ("ms_per_job_step", "ms per job-step", ".2f"),
               ("tokens_per_s", "real tokens/s", ",.0f"), ("vs_one", "x one", ".2f"),
               ("peak_gib", "peak GiB", ".1f"), ("warmup_s", "warm-up s", ".0f"),
               ("paper_sweep_min", "paper sweep min", ".1f")]
    result = {
        "title": "Packed step (K sweep jobs through one frozen GPT-2 Medium shape, E2E, batch 8 "
                 "per job)",
        "command": "python -m bench.packed_step" + (" --tiny" if args.tiny else "")
        + (f" --packs {args.packs}" if args.packs else "")
        + (f" --jobs {','.join(f'{t}{r}' for t, r in args.jobs)}" if args.jobs else "")
        + (f" --rows {args.rows}" if args.rows != BATCH else "")
        + "".join(f" {f}" for f in variant_flags(args)),
        "environment": common.environment(device), "notes": notes,
        "tables": [{"columns": columns, "rows": rows}],
    }
    common.save("packed_step", args, result)
    return result


if __name__ == "__main__":
    main()
