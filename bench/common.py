"""Shared pieces of the benchmarks: data, models, timing, and the results report.

Every benchmark runs in one process on one device and writes `bench/results/<name>.json`;
`write_report` turns all of them into `bench/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lora_repro import fastpath
from lora_repro.config import ModelConfig
from lora_repro.data import encode_dataset, length_grouped_batches, load_task
from lora_repro.modeling import load_model, load_tokenizer, train_bpe

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SHARED = HERE.parent.parent / "shared"
MEDIUM = ModelConfig(id="gpt2-medium", name="", init="random", n_layer=24, n_embd=1024, n_head=16)
TINY = ModelConfig(id="tiny", name="", init="random", n_layer=2, n_embd=64, n_head=4,
                   n_positions=512)
PAPER_E2E_STEPS = 26_290  # 42,061 examples x 5 epochs at batch 8


def arguments(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny model, seconds (a smoke test)")
    p.add_argument("--data-dir", default=str(SHARED / "data" / "e2e"))
    p.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"))
    p.add_argument("--out", default=None,
                   help="results JSON (default bench/results/<name>.json; --tiny: a temp file)")
    return p


def setup(args, test: bool = False
          ) -> tuple[object, ModelConfig, list[dict], list[str], torch.device]:
    """(tokenizer, model shape, encoded E2E train examples, test sources, device).

    Full size: GPT-2 Medium shape (random init: no weights here), the E2E dev set's examples
    tokenized with GPT-2's BPE, and with `test` the official test MRs (their paper-style
    preparation needs spaCy). Tiny: synthetic data, CPU."""
    if args.tiny:
        data = load_task("synthetic", n_train=40, n_valid=0, n_test=4)
        texts = [ex.source + " || " + ex.target for ex in data.train]
        tokenizer, shape, device = train_bpe(texts, 300), TINY, torch.device("cpu")
    else:
        data = load_task("e2e", data_dir=args.data_dir, train_file="devset.csv",
                         valid_file=None, test_file="testset_w_refs.csv" if test else None)
        tokenizer, shape, device = load_tokenizer(args.tokenizer), MEDIUM, torch.device("cuda")
    encoded = encode_dataset(tokenizer, data.train, 512)
    return tokenizer, shape, encoded, [t.source for t in data.test], device


def static_batches(encoded: list[dict], pad_id: int, batch_size: int, count: int,
                   device: torch.device) -> list[tuple[dict[str, torch.Tensor], int]]:
    """The first `count` length-grouped batches (seed 0, epoch 0), padded as the trainer's
    fast path pads them, on `device`: (batch, its real tokens) each."""
    lengths = [len(x["input_ids"]) for x in encoded]
    buckets = fastpath.length_buckets(512)
    out = []
    for idx in length_grouped_batches(lengths, batch_size, seed=0, epoch=0)[:count]:
        batch = fastpath.static_batch([encoded[i] for i in idx], pad_id, batch_size, buckets)
        out.append(({k: v.to(device) for k, v in batch.items()}, sum(lengths[i] for i in idx)))
    return out


def base_model(shape: ModelConfig, tokenizer, device, seed: int = 0):
    torch.manual_seed(seed)
    return load_model(shape, tokenizer).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def median_ms(fn, device: torch.device, repeats: int, warmup: int = 5) -> float:
    """Median wall time of `fn()` in ms, synchronizing the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (Linux) with its torch thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in
              (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
              if line.startswith("model name")]
    return f"{models[0] if models else 'CPU'}, {torch.get_num_threads()} torch threads"


def environment(device: torch.device) -> dict:
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    out = {"device": device_name(device), "versions": versions,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}
    # inductor settings given by environment (max-autotune and the like change the kernels)
    inductor = {k: v for k, v in os.environ.items()
                if k.startswith("TORCHINDUCTOR_") and k != "TORCHINDUCTOR_CACHE_DIR"}
    return out | ({"inductor": inductor} if inductor else {})


def save(name: str, args, result: dict) -> Path:
    """Write the results JSON: `--out`, else bench/results/<name>.json (and regenerate
    RESULTS.md); a --tiny run without --out goes to the temp dir, never over real results."""
    default = Path(tempfile.gettempdir()) / f"bench_{name}_tiny.json" if args.tiny else (
        RESULTS / f"{name}.json")
    path = Path(args.out) if args.out else default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if not args.tiny and args.out is None:
        write_report()
    return path


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format(row[key], fmt) if row.get(key) is not None else "-"
                 for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report() -> Path:
    """Regenerate `bench/RESULTS.md` from every JSON in `bench/results/`."""
    out = ["# Benchmark results", "",
           "Generated by `python -m bench.<name>` on the device named in each section; "
           "do not edit by hand.", ""]
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())
        env = r["environment"]
        versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        out += [f"## {r['title']}", "", f"{env['device']}, {versions}, {env['date']}. "
                f"Command: `{r['command']}`.", "", *r.get("notes", []), ""]
        for table in r["tables"]:
            out += _table(table["rows"], [tuple(c) for c in table["columns"]]) + [""]
    path = HERE / "RESULTS.md"
    path.write_text("\n".join(out))
    return path
