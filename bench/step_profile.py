"""Step profile: where one fast-path LoRA training step spends its time, kernel by kernel.

    python -m bench.step_profile            # GPU: GPT-2 Medium shape, E2E dev batches, batch 8
    python -m bench.step_profile --tiny     # CPU smoke test of the script itself
    python -m bench.step_profile --targets qkvo   # one target set (a process of its own)
    python -m bench.step_profile --pack 10        # the mission sweep's 10 jobs packed
    python -m bench.step_profile --pack 1 --rows 80   # about the base alone, on 80 rows

For targets qv and qkvo (r=4): the step as the trainer runs it (compiled loss, CUDA graphs,
bf16 autocast, fused AdamW), timed with the device synchronized; then the same compiled step
without CUDA graphs under torch.profiler (the same kernels, launched one by one: a profile of
graph replays need not list them), summed per kernel name. Kernel time per step against the
step's wall time says whether the GPU's work or what surrounds it bounds a step, and so
whether jobs sharing a GPU can overlap (bench.sweep); the top kernels say which work to cut.
With `--pack K` the step is that of the first K mission-sweep jobs trained as one
(`lora_repro.lora.packed`, as `bench.packed_step` and a packed sweep run it).
On CPU (--tiny) the plain eager step is profiled and its operators take the kernels' place.
"""

from __future__ import annotations

import time
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from bench import common, packed_step
from lora_repro import fastpath
from lora_repro.lora import apply_lora
from lora_repro.packed_trainer import pack_loss
from lora_repro.trainer import lm_loss

RANK, ALPHA, DROPOUT, SMOOTH, BATCH, TOP = 4, 32.0, 0.1, 0.1, 8, 12


def step_fn(model, loss_fn, device, graphs: bool):
    """One training step on a static batch, as the trainer's fast path runs it."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01, fused=device.type == "cuda")

    def step(batch: dict[str, torch.Tensor]) -> None:
        if graphs:
            fastpath.step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model, batch["input_ids"], batch["labels"], SMOOTH)
        loss.sum().backward()  # a pack's loss is one per job
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def kernel_table(prof, steps: int, on_gpu: bool) -> list[dict]:
    """Per kernel (GPU) or operator (CPU) name: calls and microseconds per step, self time.
    User annotations (`Optimizer.step#AdamW.step`, also listed on the GPU's timeline) are
    not kernels: counting them would count their kernels twice."""
    calls: dict[str, int] = {}
    us: dict[str, float] = {}
    for e in prof.events():
        t = e.self_device_time_total if on_gpu else e.self_cpu_time_total
        if ((e.device_type.name == "CUDA") == on_gpu and t > 0
                and not getattr(e, "is_user_annotation", False)):
            calls[e.name] = calls.get(e.name, 0) + 1
            us[e.name] = us.get(e.name, 0.0) + t
    rows = [{"kernel": name, "calls": calls[name] / steps, "us": us[name] / steps}
            for name in us]
    return sorted(rows, key=lambda r: -r["us"])


# (category, name fragments): a kernel's category is the first whose fragment its name has
CATEGORIES = (
    ("attention", ("fmha", "flash", "attention")),
    ("optimizer", ("multi_tensor_apply", "adam")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
    ("fused (Triton)", ("triton_",)),
)


def categories(kernels: list[dict], label: str) -> list[dict]:
    """`kernel_table`'s rows summed per kind of kernel (`CATEGORIES`, else "other")."""
    total = sum(k["us"] for k in kernels)
    out: dict[str, dict] = {}
    for k in kernels:
        name = k["kernel"].lower()
        kind = next((c for c, parts in CATEGORIES if any(p in name for p in parts)), "other")
        row = out.setdefault(kind, {"targets": label, "category": kind, "calls": 0.0,
                                    "us": 0.0})
        row["calls"] += k["calls"]
        row["us"] += k["us"]
    return [{**row, "share": row["us"] / total}
            for row in sorted(out.values(), key=lambda r: -r["us"])]


def single(targets: str, shape, tokenizer, device):
    """(label, model, loss, batch of the step) for one job of r=4 on `targets`."""
    model = apply_lora(common.base_model(shape, tokenizer, device), targets, RANK, ALPHA,
                       DROPOUT)
    return targets, model, lm_loss, lambda batch: batch


def packed(k: int, shape, tokenizer, device):
    """(label, model, loss, batch of the step) for the first `k` mission-sweep jobs packed:
    each job on its own copy of the batch."""
    model = packed_step.packed_model(packed_step.JOBS[:k], shape, tokenizer, device)
    return (f"pack of {k}", model, partial(pack_loss, jobs=k),
            lambda batch: {name: x.repeat(k, 1) for name, x in batch.items()})


def measure(case, batches, device, steps: int) -> tuple[dict, list, list]:
    """(the step's row, its top kernels, its kernel categories) for one case (`single` or
    `packed`)."""
    on_gpu = device.type == "cuda"
    targets, model, base_loss, expand = case
    model.train()
    batches = [expand(b) for b in batches]
    shapes = sorted({tuple(b["input_ids"].shape) for b in batches})
    row = {"targets": targets, "shapes": len(shapes)}

    def timed(graphs: bool):
        """Compile (on GPU), warm up, run every batch: (the step, warm-up s, ms/step)."""
        t0 = time.perf_counter()
        loss_fn = base_loss
        if on_gpu:
            torch._dynamo.reset()  # each case compiles afresh (and stays under dynamo's limit)
            loss_fn = fastpath.compile_loss(
                partial(base_loss, vocab_multiple=fastpath.VOCAB_MULTIPLE), cuda_graphs=graphs)
            fastpath.warm_up(loss_fn, model, shapes,
                             lambda: torch.autocast("cuda", dtype=torch.bfloat16), SMOOTH)
        step = step_fn(model, loss_fn, device, graphs)
        for batch in batches[:3]:
            step(batch)
        common.sync(device)
        t1 = time.perf_counter()
        for batch in batches:
            step(batch)
        common.sync(device)
        return step, t1 - t0, 1e3 * (time.perf_counter() - t1) / len(batches)

    step, row["warmup_s"], row["wall_ms"] = timed(graphs=on_gpu)
    if on_gpu:
        step, _, row["wall_no_graphs_ms"] = timed(graphs=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for batch in batches[:steps]:
            step(batch)
        common.sync(device)
    kernels = kernel_table(prof, min(steps, len(batches)), on_gpu)
    total = sum(k["us"] for k in kernels)
    row.update(kernel_ms=total / 1e3, kernels=sum(k["calls"] for k in kernels),
               busy=total / 1e3 / row["wall_ms"])
    top = [{"targets": targets, **k, "share": k["us"] / total} for k in kernels[:TOP]]
    return row, top, categories(kernels, targets)


def main(argv=None) -> dict:
    parser = common.arguments(__doc__.splitlines()[0])
    parser.add_argument("--targets", default="qv,qkvo", help="target sets, in this order")
    parser.add_argument("--pack", type=int, default=0,
                        help="profile the first K mission-sweep jobs packed instead")
    parser.add_argument("--rows", type=int, default=BATCH, help="batch rows (per job)")
    args = parser.parse_args(argv)
    tokenizer, shape, encoded, _, device = common.setup(args)
    steps = 3 if args.tiny else 20
    batches = [b for b, _ in common.static_batches(encoded, tokenizer.pad_token_id, args.rows,
                                                 2 * steps, device)]
    rows, tops, kinds = [], [], []
    cases = ([partial(packed, args.pack)] if args.pack else
             [partial(single, targets) for targets in args.targets.split(",")])
    for case in cases:
        row, top, kind = measure(case(shape, tokenizer, device), batches, device, steps)
        rows.append(row)
        tops += top
        kinds += kind
    unit = "kernels" if device.type == "cuda" else "operators (CPU, eager)"
    what = (f"The first {args.pack} mission-sweep jobs packed (lora_repro.lora.packed), batch "
            f"{args.rows} per job" if args.pack else f"LoRA r={RANK}, batch {args.rows}")
    notes = [
        f"{what}, {len(batches)} length-grouped E2E batches (padded to "
        f"the fast path's buckets), timed after a warm-up; {steps} of them profiled. Wall: "
        "the step as training runs it (CUDA graphs), device synchronized. Kernel time: the "
        f"self time of the step's {unit} per step, from torch.profiler over the same compiled "
        "step without CUDA graphs. Busy: kernel time / wall time. The second table: the top "
        f"{TOP} {unit} of each step by time, with their share of its kernel time. The third: "
        "all of them by kind, from their names (attention, optimizer, GEMM (cuBLAS, CUTLASS), "
        "fused (inductor's Triton kernels: elementwise, norms, reductions), other).",
    ]
    columns = [("targets", "targets", "s"), ("shapes", "batch shapes", "d"),
               ("wall_ms", "wall ms/step", ".2f"),
               ("wall_no_graphs_ms", "no CUDA graphs ms/step", ".2f"),
               ("kernel_ms", "kernel ms/step", ".2f"), ("kernels", "kernels/step", ".0f"),
               ("busy", "busy", ".0%"), ("warmup_s", "warm-up s", ".0f")]
    top_columns = [("targets", "targets", "s"), ("kernel", "kernel", "s"),
                   ("calls", "calls/step", ".1f"), ("us", "us/step", ",.1f"),
                   ("share", "share", ".1%")]
    kind_columns = [("targets", "targets", "s"), ("category", "kind", "s"),
                    ("calls", "calls/step", ".1f"), ("us", "us/step", ",.1f"),
                    ("share", "share", ".1%")]
    for t in tops:  # a table cell: no pipes, and long template names cut
        t["kernel"] = t["kernel"].replace("|", "/")[:90]
    result = {
        "title": (f"Step profile, {args.pack} job{'s' * (args.pack > 1)} packed (GPT-2 Medium "
                  f"shape, E2E, batch {args.rows} per job)" if args.pack else
                  f"Step profile (GPT-2 Medium shape, E2E, batch {args.rows}, LoRA r=4)"),
        "command": "python -m bench.step_profile" + (" --tiny" if args.tiny else "")
        + (f" --targets {args.targets}" if args.targets != "qv,qkvo" else "")
        + (f" --pack {args.pack}" if args.pack else "")
        + (f" --rows {args.rows}" if args.rows != BATCH else ""),
        "environment": common.environment(device), "notes": notes,
        "tables": [{"columns": columns, "rows": rows}, {"columns": top_columns, "rows": tops},
                   {"columns": kind_columns, "rows": kinds}],
    }
    common.save("step_profile_pack" if args.pack else "step_profile", args, result)
    return result


if __name__ == "__main__":
    main()
