"""Sweep benchmark: the mission sweep through the parallel launcher, sequential against
parallel, several `per_gpu`, on one GPU or more, each part a real `lora_repro.train -m` command.

    python -m bench.sweep --data-dir ../shared/data/e2e --tokenizer ../shared/gpt2-tokenizer
    python -m bench.sweep --gpus 0 0,1 --parts cold,parallel   # 1 GPU against 2 (issue 19)
    python -m bench.sweep --tiny                                # CPU smoke test of the script

The sweep: rank=1,2,4,8,64 x targets=qv,qkvo, GPT-2 Medium shape (`model.init=random`), E2E
dev examples (`+experiment=offline_e2e`), batch 8, `--steps` steps per job (no decoding).
Parts, in this order, within `--budget-s` (a part that cannot fit is skipped or cut, and the
report says so):
- cold: every job at once (per_gpu=10) into an empty compile cache: pays each shape's
  compilation once and fills the cache; its warm-ups are cold-compile times.
- parallel: per_gpu=`--per-gpu` (default: what the launcher's default, auto, picks for the
  first GPU set) from the warm cache, on each GPU set of `--gpus`.
- sequential: per_gpu=1 (one job at a time) on the ranks `--seq-ranks` (both targets); its
  10-job wall time is projected from the mean job.
- per_gpu: the sweep again at each of `--per-gpu-sweep`, while the budget lasts.
Per part: wall time; aggregate real tokens/s while any job trained, and over the wall time;
per job: warm-up (to the first step), wall-clock ms/step and real tokens/s after the first
log line, peak memory, GPU; jobs per GPU and the most jobs alive at once on a GPU (all from
the jobs' own summary.json and metrics.jsonl); the projected wall time of the sweep at the
paper's setting (26,290 steps per job).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from hydra_plugins.lora_repro_launcher import launcher

ROOT = Path(__file__).resolve().parents[1]
RANKS, TARGETS = "1,2,4,8,64", "qv,qkvo"


def parse(argv):
    p = common.arguments(__doc__.splitlines()[0])
    p.add_argument("--gpus", nargs="+", default=None,
                   help="GPU sets to compare, e.g. `0 0,1`; default: every visible GPU")
    p.add_argument("--parts", default="cold,parallel,sequential,per_gpu")
    p.add_argument("--per-gpu", default="auto",
                   help="the parallel part's per_gpu: a number, or auto (the launcher's default, "
                        "from the GPU's memory: 10 on an H200)")
    p.add_argument("--per-gpu-sweep", default="10,8,2", help="in the order they run")
    p.add_argument("--seq-ranks", default="1", help="ranks of the sequential part")
    p.add_argument("--steps", type=int, default=1500,
                   help="steps per job (526 per epoch): long enough for the jobs of a wave, "
                        "which finish warming up at different times, to train side by side")
    p.add_argument("--cold-steps", type=int, default=60)
    p.add_argument("--budget-s", type=float, default=900, help="the whole benchmark's limit")
    p.add_argument("--mps", action="store_true",
                   help="every part under an MPS server (hydra.launcher.mps=true)")
    p.add_argument("--pack", type=int, default=1,
                   help="jobs trained as one pack (hydra.launcher.pack); 1: off")
    p.add_argument("--cache-dir", default=None, help="compile cache (default: a fresh one)")
    p.add_argument("--work-dir", default=None, help="sweep dirs (default: a temp dir)")
    args = p.parse_args(argv)
    if args.tiny:
        args.gpus = args.gpus or ["0"]  # injected: the CPU jobs run as if on GPU 0
        args.parts = "parallel,sequential" if args.parts == p.get_default("parts") else args.parts
        args.per_gpu, args.seq_ranks, args.steps = 2, "1", 4
        args.budget_s = 3600.0
    return args


def sweep_args(args, ranks: str, targets: str, steps: int) -> list[str]:
    if args.tiny:
        return ["+experiment=smoke", f"rank={ranks}", f"targets={targets}", f"max_steps={steps}",
                "task.n_train=40", "task.n_valid=8", "eval.test=false", "eval.base=false",
                "logger.every=2",
                "logger.wandb.mode=disabled"]
    return ["+experiment=offline_e2e", "model=gpt2-medium", "model.init=random",
            f"model.tokenizer={Path(args.tokenizer).resolve()}",
            f"task.data_dir={Path(args.data_dir).resolve()}", f"rank={ranks}",
            f"targets={targets}", "batch_size=8", f"max_steps={steps}", "eval.test=false",
            "logger.every=25", "checkpoint_every=0", "logger.wandb.mode=disabled"]


def run_sweep(argv: list[str], env: dict, timeout: float) -> tuple[float, int | str]:
    """Run one sweep command; kill it (and its jobs) past `timeout`. (wall s, exit code)."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "lora_repro.train", "-m", *argv], cwd=ROOT,
                            env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = "cut by the time budget"
    sys.stderr.write(out[-3000:] if rc else "")
    return time.time() - t0, rc


def job_record(job_dir: Path) -> dict | None:
    """A finished job's summary and its step time: wall-clock ms per step between its first
    and last log lines (the first step, which holds the compilation, left out); its real
    tokens/s is then its mean real tokens per step over that step time."""
    if not (job_dir / "summary.json").is_file():
        return None
    summary = json.loads((job_dir / "summary.json").read_text())
    lines = [json.loads(x) for x in (job_dir / "metrics.jsonl").read_text().splitlines()]
    lines = [x for x in lines if "train_loss" in x and "time" in x]
    steps = lines[-1]["step"] - lines[0]["step"] if len(lines) > 1 else 0
    ms = 1e3 * (lines[-1]["time"] - lines[0]["time"]) / steps if steps else None
    # the typical log interval: steps only (the intervals holding a validation are outliers)
    gaps = [1e3 * (b["time"] - a["time"]) / (b["step"] - a["step"])
            for a, b in itertools.pairwise(lines) if b["step"] > a["step"]]
    tokens_per_step = summary["train_tokens"] / summary["steps"]
    return {"job": job_dir.name.split("_")[0], "gpu": summary.get("cuda_visible_devices"),
            "warmup_s": summary.get("warmup_s"), "compile_s": summary.get("compile_s"),
            "peak_gib": summary.get("peak_memory_gib"),
            "tokens_per_s": tokens_per_step / ms * 1e3 if ms else None, "ms_per_step": ms,
            "steady_ms_per_step": statistics.median(gaps) if gaps else None,
            "train_tokens": summary["train_tokens"], "tokens_per_step": tokens_per_step,
            "started_at": summary["started_at"], "ended_at": summary["ended_at"]}


def aggregate(jobs: list[dict]) -> tuple[float | None, float]:
    """(real tokens/s, s): all the jobs' real tokens over the time at least one of them
    trained (from its first step to its end, validation included), from their records."""
    spans = sorted((j["started_at"] + j["warmup_s"], j["ended_at"]) for j in jobs)
    busy, end = 0.0, -math.inf
    for s, e in spans:  # the length of the union of the spans
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    return (sum(j["train_tokens"] for j in jobs) / busy if busy else None), busy


def most_at_once(jobs: list[dict]) -> int:
    """The most jobs alive at once on one GPU (or CPU), from their start and end records."""
    best = 0
    for gpu in {j["gpu"] for j in jobs}:
        spans = [(j["started_at"], j["ended_at"]) for j in jobs if j["gpu"] == gpu]
        best = max(best, max(sum(s <= t < e for s, e in spans) for t, _ in spans))
    return best


def summarize(part: str, gpus: str, per_gpu: int, jobs: list[dict], wall: float, rc,
              n_sweep: int, pack: int = 1) -> dict:
    agg, agg_s = aggregate(jobs) if jobs else (None, 0.0)
    med = lambda key: statistics.median(v) if (v := [j[key] for j in jobs if j[key]]) else None
    n_gpus = len(gpus.split(","))
    waves = math.ceil(math.ceil(n_sweep / pack) / (per_gpu * n_gpus))  # processes' waves
    warm = med("warmup_s")
    paper_tokens = n_sweep * common.PAPER_E2E_STEPS * (med("tokens_per_step") or 0)
    projected = (waves * warm + paper_tokens / agg) / 60 if agg and warm else None
    steady = med("steady_ms_per_step")  # waves of (warm-up + 26,290 steps at the steady rate)
    steady_projected = (waves * (warm + common.PAPER_E2E_STEPS * steady / 1e3) / 60
                        if steady and warm else None)
    if part == "cold":  # its jobs step while the others still compile: nearly alone
        projected = steady_projected = None
    per_gpu_count = {}
    for j in jobs:
        per_gpu_count[j["gpu"]] = per_gpu_count.get(j["gpu"], 0) + 1
    return {
        "part": part, "gpus": gpus, "per_gpu": per_gpu, "jobs": len(jobs), "wall_s": wall,
        "status": "ok" if rc in (0, 2) else str(rc),
        "wall_10_jobs_s": wall * n_sweep / len(jobs) if part == "sequential" and jobs else wall,
        "aggregate_tokens_per_s": agg, "aggregate_s": agg_s,
        "effective_tokens_per_s": sum(j["train_tokens"] for j in jobs) / wall,
        "job_tokens_per_s": med("tokens_per_s"), "ms_per_step": med("ms_per_step"),
        "vs_alone": None,  # set once the sequential part (a job alone) has run
        "warmup_first_s": min((j["warmup_s"] for j in jobs if j["warmup_s"]), default=None),
        "warmup_median_s": warm, "warmup_max_s": max((j["warmup_s"] or 0 for j in jobs),
                                                       default=None),
        "peak_gib": max((j["peak_gib"] for j in jobs if j["peak_gib"]), default=None),
        "jobs_per_gpu": " ".join(f"{g}:{n}" for g, n in sorted(per_gpu_count.items(),
                                                                key=lambda x: str(x[0]))),
        "most_at_once_per_gpu": most_at_once(jobs) if jobs else None,
        "projected_paper_min": projected, "steady_ms_per_step": steady,
        "steady_projected_paper_min": steady_projected,
    }


def plan(args, gpu_sets: list[str]) -> list[tuple[str, str, int, str, int]]:
    """(part, GPU set, per_gpu, ranks, steps) in the order they run."""
    parts, first = args.parts.split(","), gpu_sets[0]
    out = []
    if "cold" in parts:
        out.append(("cold", first, 10, RANKS, args.cold_steps))
    if "parallel" in parts:
        out += [("parallel", g, args.per_gpu, RANKS, args.steps) for g in gpu_sets]
    if "sequential" in parts:
        out.append(("sequential", first, 1, args.seq_ranks, args.steps))
    if "per_gpu" in parts:
        out += [(f"per_gpu={p}", first, int(p), RANKS, args.steps)
                for p in args.per_gpu_sweep.split(",") if int(p) != args.per_gpu]
    return out


def main(argv=None) -> dict:
    args = parse(argv)
    t_start = time.time()
    gpu_sets = args.gpus or [",".join(str(i) for i in range(torch.cuda.device_count()))]
    if not all(gpu_sets):
        raise SystemExit("error: no GPU visible; pass --gpus or --tiny")
    args.per_gpu, _ = launcher.resolve_per_gpu(args.per_gpu, gpu_sets[0].split(","))
    if not str(args.per_gpu).isdigit() or int(args.per_gpu) < 1:
        raise SystemExit(f"error: --per-gpu {args.per_gpu}: must be an integer >= 1 or auto")
    args.per_gpu = int(args.per_gpu)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_sweep_"))
    cache = Path(args.cache_dir or work / "inductor")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "WANDB_MODE": "disabled"}
    env.pop("LORA_REPRO_GPUS", None)
    targets = "qv" if args.tiny else TARGETS
    n_sweep = len((("1,2" if args.tiny else RANKS)).split(",")) * len(targets.split(","))
    rows, job_rows, skipped, alone_ms, last_job_s = [], [], [], None, None
    for part, gpus, per_gpu, ranks, steps in plan(args, gpu_sets):
        ranks = "1,2" if args.tiny and ranks == RANKS else ranks
        n_jobs = len(ranks.split(",")) * len(targets.split(","))
        left = args.budget_s - (time.time() - t_start)
        waves = math.ceil(math.ceil(n_jobs / args.pack) / (per_gpu * len(gpus.split(","))))
        if last_job_s is not None and waves * last_job_s > left or left < 20:
            skipped.append(f"{part} on GPUs {gpus} (about {waves * (last_job_s or 0):.0f} s; "
                           f"{left:.0f} s left)")
            continue
        # no "=" in the path: Hydra would read `hydra.sweep.dir=...per_gpu=10...` as two keys
        sweep_dir = work / f"{part.replace('=', '')}-gpus{gpus.replace(',', '+')}"
        argv = [*sweep_args(args, ranks, targets, steps), f"hydra.sweep.dir={sweep_dir}",
                f"hydra.launcher.gpus=[{gpus}]", f"hydra.launcher.per_gpu={per_gpu}",
                f"hydra.launcher.mps={str(args.mps).lower()}", f"hydra.launcher.pack={args.pack}"]
        print(f"{part}: {n_jobs} jobs, GPUs {gpus}, per_gpu {per_gpu}", file=sys.stderr)
        wall, rc = run_sweep(argv, env, left)
        jobs = [j for d in sorted(sweep_dir.glob("r*")) if (j := job_record(d))]
        if part == "sequential":
            alone_ms = statistics.median(j["ms_per_step"] for j in jobs if j["ms_per_step"]) \
                if any(j["ms_per_step"] for j in jobs) else None
        if jobs and part != "cold":
            last_job_s = statistics.median(j["ended_at"] - j["started_at"] for j in jobs) + 8
        elif last_job_s is None:
            last_job_s = 30.0 if not args.tiny else 0.0
        rows.append(summarize(part, gpus, per_gpu, jobs, wall, rc, n_sweep, args.pack))
        job_rows += [{"part": part, **j} for j in jobs]
    for row in rows:  # step time against a job alone (the sequential part's)
        if row["ms_per_step"] and alone_ms:
            row["vs_alone"] = row["ms_per_step"] / alone_ms
    if args.work_dir is None:  # the runs and the compile cache of a temp dir are spent
        shutil.rmtree(work, ignore_errors=True)
    return report(args, rows, job_rows, skipped, time.time() - t_start, n_sweep, steps_note(args))


def steps_note(args) -> str:
    return (f"{args.steps} steps per job ({args.cold_steps} in the cold part), batch 8, "
            "E2E dev examples, GPT-2 Medium shape (random init), LoRA alpha 32, no decoding")


def report(args, rows, job_rows, skipped, total_s, n_sweep, note) -> dict:
    env = common.environment(torch.device("cpu"))
    if torch.cuda.is_available() and not args.tiny:
        env["device"] = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    grid = "tiny: rank=1,2 x qv" if args.tiny else "rank=1,2,4,8,64 x targets=qv,qkvo"
    notes = [
        f"{n_sweep}-job sweep ({grid}), {note}; each part is one "
        "`python -m lora_repro.train -m ...` command with the parallel launcher. Aggregate: "
        "all the jobs' real tokens over the time at least one of them trained (first step to "
        "end, validation included); effective: over the wall time. Per job: wall-clock ms/step "
        "between its first and last log lines (validation included), and its mean real "
        "tokens per step over that. "
        "Warm-up: a job's time to its first step (data, model, compilation); compile: the "
        "part of it spent compiling and recording every batch shape (`fastpath.warm_up`). "
        "x alone: per-job ms/step against the sequential part's. 10-job wall of the "
        "sequential part: its wall x 10 / its jobs. Projected: ceil(processes / slots) "
        "waves (a process trains one job, or one pack of `--pack`) x the median warm-up, "
        "plus the paper sweep's real tokens (10 x 26,290 steps x the mean tokens per step) "
        "at the part's aggregate rate. Steady ms/step: the median over a job's log "
        "intervals (those holding an end-of-epoch validation and checkpoint are outliers "
        "there, while a short run's aggregate counts them: 2 epoch ends in 1,500 steps, "
        "against 5 in the paper's 26,290); steady projection: waves x (median warm-up + "
        "26,290 steps at the median steady ms/step).",
        "",
        f"Whole benchmark: {total_s:.0f} s (budget {args.budget_s:.0f} s)."
        + (f" Skipped for the budget: {'; '.join(skipped)}." if skipped else ""),
    ]
    columns = [("part", "part", "s"), ("gpus", "GPUs", "s"), ("per_gpu", "per GPU", "d"),
               ("jobs", "jobs", "d"), ("wall_s", "wall s", ".0f"),
               ("wall_10_jobs_s", "10-job wall s", ".0f"),
               ("aggregate_tokens_per_s", "aggregate tok/s", ",.0f"),
               ("aggregate_s", "over s", ".0f"),
               ("effective_tokens_per_s", "effective tok/s", ",.0f"),
               ("job_tokens_per_s", "per-job tok/s", ",.0f"), ("ms_per_step", "ms/step", ".1f"),
               ("vs_alone", "x alone", ".2f"), ("warmup_first_s", "warm-up min s", ".0f"),
               ("warmup_median_s", "warm-up median s", ".0f"),
               ("warmup_max_s", "warm-up max s", ".0f"), ("peak_gib", "peak GiB", ".1f"),
               ("jobs_per_gpu", "jobs per GPU", "s"),
               ("most_at_once_per_gpu", "most at once per GPU", "d"),
               ("projected_paper_min", "paper sweep min", ".1f"),
               ("steady_ms_per_step", "steady ms/step", ".1f"),
               ("steady_projected_paper_min", "steady paper sweep min", ".1f"),
               ("status", "status", "s")]
    job_columns = [("part", "part", "s"), ("job", "job", "s"), ("gpu", "GPU", "s"),
                   ("warmup_s", "warm-up s", ".1f"), ("compile_s", "compile s", ".1f"),
                   ("tokens_per_s", "tok/s", ",.0f"),
                   ("ms_per_step", "ms/step", ".1f"),
                   ("steady_ms_per_step", "steady ms/step", ".1f"),
                   ("peak_gib", "peak GiB", ".2f")]
    result = {
        "title": "Sweep (mission sweep, parallel launcher, GPT-2 Medium shape, E2E, batch 8)"
        + (f", GPU sets {' vs '.join(args.gpus)}" if args.gpus and not args.tiny else "")
        + (", under MPS" if args.mps else "")
        + (f", packs of {args.pack}" if args.pack > 1 else ""),
        "command": "python -m bench.sweep" + (" --tiny" if args.tiny else "")
        + (f" --gpus {' '.join(args.gpus)}" if args.gpus and not args.tiny else "")
        + (" --mps" if args.mps else "") + (f" --pack {args.pack}" if args.pack > 1 else ""),
        "environment": env, "notes": notes,
        "tables": [{"columns": columns, "rows": rows},
                   {"columns": job_columns, "rows": job_rows}],
        "total_s": total_s,
    }
    common.save("sweep_pack" if args.pack > 1 else "sweep_mps" if args.mps else "sweep", args,
                result)
    return result


if __name__ == "__main__":
    main()
