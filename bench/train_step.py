"""Training-step benchmark: this toolkit against peft + a plain loop, HF Trainer + peft, and
full fine-tuning, in one process on one device with the same data.

    python -m bench.train_step            # GPU: GPT-2 Medium shape, E2E dev examples, batch 8
    python -m bench.train_step --tiny     # CPU smoke test of the script itself

Measures ms/step after warm-up (the warm-up pass sees every batch shape once, so compile and
CUDA-graph recording stay out of the numbers and are reported apart), real (non-pad)
tokens/s, peak memory, and the projected time of the paper's 26,290-step E2E run. Also
checks that the fast path's loss curve follows the plain path's (same seed and batches).
"""

from __future__ import annotations

import random
import sys
import tempfile
import time

import torch

from bench import common
from lora_repro import fastpath
from lora_repro.data import collate, length_grouped_batches
from lora_repro.data.encoding import IGNORE_INDEX
from lora_repro.lora import apply_lora
from lora_repro.trainer import lm_loss

LR, WD, RANK, ALPHA, DROPOUT, SMOOTH, BATCH = 2e-4, 0.01, 4, 32.0, 0.1, 0.1, 8


def random_batches(n: int, count: int, seed: int = 0) -> list[list[int]]:
    """Batches of a random sampler (what the baselines and HF Trainer use)."""
    order = random.Random(seed).sample(range(n), n)
    return [order[i * BATCH:(i + 1) * BATCH] for i in range(count)]


def hf_loss(model, batch, smoothing):
    """A plain HF-style step: the model's forward with an attention mask, CE with smoothing."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX, label_smoothing=smoothing)


def run_loop(model, encoded, batches, device, pad, *, bf16, loss="ours", pad_to=None, fast=False):
    """Train on `batches` twice: a warm-up pass (its losses are the first steps' loss curve),
    then the timed pass. Returns timing and the warm-up losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=device.type == "cuda")
    loss_fn = fastpath.compile_loss(lm_loss) if fast else lm_loss
    buckets = fastpath.length_buckets(512) if fast else None

    def step(idx):
        feats = [encoded[i] for i in idx]
        if pad_to:
            batch = collate(feats, pad, pad_to=pad_to)
        else:
            batch = fastpath.static_batch(feats, pad, BATCH, buckets)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if fast:
            fastpath.step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if loss == "ours":
                out = loss_fn(model, batch["input_ids"], batch["labels"], SMOOTH)
            else:
                out = hf_loss(model, batch, SMOOTH)
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.detach().clone()  # CUDA-graph outputs are overwritten by the next replay

    t0 = time.perf_counter()
    losses = [step(idx) for idx in batches]
    common.sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for idx in batches:
        step(idx)
    common.sync(device)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(encoded[i]["input_ids"]) for idx in batches for i in idx)
    return {"ms_per_step": 1e3 * elapsed / len(batches), "tokens_per_s": tokens / elapsed,
            "warmup_s": warm_s, "losses": [float(x) for x in losses]}


def peft_model(shape, tokenizer, device):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=["c_attn"],
                        fan_in_fan_out=True)
    return get_peft_model(common.base_model(shape, tokenizer, device), config)


def hf_trainer(shape, tokenizer, encoded, batches, device, bf16, pad):
    """HF Trainer + peft with its own random sampler; times the steps after a warm-up."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    warm, n = len(batches), len(batches)
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warm, warm + n):
                common.sync(device)
                marks[state.global_step] = time.perf_counter()

    def collator(feats):
        return collate(feats, pad)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=BATCH, learning_rate=LR,
            weight_decay=WD, max_steps=warm + n, bf16=bf16, label_smoothing_factor=SMOOTH,
            logging_steps=10**6, save_strategy="no", report_to=[], dataloader_num_workers=0,
            remove_unused_columns=False, use_cpu=device.type == "cpu", seed=0,
        )
        model = peft_model(shape, tokenizer, device)
        Trainer(model=model, args=args, train_dataset=encoded, data_collator=collator,
                callbacks=[Clock()]).train()
    elapsed = marks[warm + n] - marks[warm]
    return {"ms_per_step": 1e3 * elapsed / n, "tokens_per_s": None}


def main(argv=None) -> None:
    args = common.arguments(__doc__.splitlines()[0]).parse_args(argv)
    tokenizer, shape, encoded, _, device = common.setup(args)
    steps = 3 if args.tiny else 200
    lengths = [len(x["input_ids"]) for x in encoded]
    grouped = length_grouped_batches(lengths, BATCH, seed=0, epoch=0)[:steps]
    rand = random_batches(len(encoded), steps)
    bf16 = device.type == "cuda"
    pad = tokenizer.pad_token_id
    rows, curves = [], {}

    def measure(name, build, **kw):
        common.reset_memory(device)
        model = build()
        try:
            result = run_loop(model, encoded, kw.pop("batches", rand), device, pad, **kw)
        except Exception as e:  # keep measuring the other setups; the report shows the error
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"setup": f"{name} (failed: {type(e).__name__})", "ms_per_step": None})
            curves[name] = []
            return
        result.update(setup=name, peak_gib=common.peak_gib(device))
        result["projected_e2e_min"] = result["ms_per_step"] * common.PAPER_E2E_STEPS / 6e4
        curves[name] = result.pop("losses")
        rows.append(result)
        print(f"{name}: {result['ms_per_step']:.1f} ms/step", file=sys.stderr)
        del model

    def ours():
        model = common.base_model(shape, tokenizer, device)
        return apply_lora(model, "qv", RANK, ALPHA, DROPOUT).train()

    def full():
        model = common.base_model(shape, tokenizer, device).train()
        model.requires_grad_(True)
        return model

    fast = device.type == "cuda"
    measure("lora-repro, fast path (qv, r=4)", ours, bf16=bf16, fast=fast, batches=grouped)
    measure("lora-repro, plain path (qv, r=4)", ours, bf16=bf16, batches=grouped)
    measure("peft LoRA, fp32, padded to 512", lambda: peft_model(shape, tokenizer, device),
            bf16=False, loss="hf", pad_to=512)
    measure("peft LoRA, fp32, dynamic padding", lambda: peft_model(shape, tokenizer, device),
            bf16=False, loss="hf")
    measure("peft LoRA, bf16 + SDPA, dynamic padding",
            lambda: peft_model(shape, tokenizer, device), bf16=bf16, loss="hf")
    measure("full fine-tuning, bf16 + SDPA", full, bf16=bf16, loss="hf")
    common.reset_memory(device)
    trainer = hf_trainer(shape, tokenizer, encoded, rand, device, bf16, pad)
    trainer.update(setup="HF Trainer + peft, bf16, random sampler",
                   peak_gib=common.peak_gib(device))
    trainer["projected_e2e_min"] = trainer["ms_per_step"] * common.PAPER_E2E_STEPS / 6e4
    mean_tokens = sum(len(x["input_ids"]) for x in encoded) / len(encoded)
    trainer["tokens_per_s"] = mean_tokens * BATCH / (trainer["ms_per_step"] / 1e3)
    rows.append(trainer)

    fast_curve = curves["lora-repro, fast path (qv, r=4)"]
    plain_curve = curves["lora-repro, plain path (qv, r=4)"]
    rel = [abs(a - b) / b for a, b in zip(fast_curve, plain_curve, strict=False)] or [float("nan")]
    by = {r["setup"]: r for r in rows}
    fast_row = by.get("lora-repro, fast path (qv, r=4)", {})
    full_row = by.get("full fine-tuning, bf16 + SDPA", {})
    vs_trainer = _ratio(by.get("HF Trainer + peft, bf16, random sampler"), fast_row, "ms_per_step")
    vs_padded = _ratio(by.get("peft LoRA, fp32, padded to 512"), fast_row, "ms_per_step")
    notes = [
        f"Batch {BATCH}, {steps} timed steps after one warm-up pass over the same batches. "
        "lora-repro uses its length-grouped batches; the baselines a random sampler over the "
        "same examples. peft adapts the whole fused c_attn (q, k and v): it cannot adapt q and "
        "v alone. Tokens/s counts real (non-pad) tokens; HF Trainer's is estimated from the "
        "mean example length.",
        "",
        f"Speed-up of the fast path: {vs_trainer} HF Trainer + peft, {vs_padded} "
        f"the padded fp32 baseline. LoRA / full fine-tuning peak memory: "
        f"{_ratio(fast_row, full_row, 'peak_gib')}. Fast vs plain loss over the first {steps} "
        f"steps (same seed and batches): max relative difference {max(rel):.2%}, mean "
        f"{sum(rel) / len(rel):.2%}.",
    ]
    columns = [("setup", "setup", "s"), ("ms_per_step", "ms/step", ".1f"),
               ("tokens_per_s", "real tokens/s", ",.0f"), ("peak_gib", "peak GiB", ".1f"),
               ("projected_e2e_min", "paper E2E run (min)", ".1f"),
               ("warmup_s", "warm-up s", ".0f")]
    common.save("train_step", args, {
        "title": "Training step (GPT-2 Medium shape, E2E, batch 8)",
        "command": "python -m bench.train_step" + (" --tiny" if args.tiny else ""),
        "environment": common.environment(device), "notes": notes,
        "tables": [{"columns": columns, "rows": rows}],
        "curves": {"fast": fast_curve, "plain": plain_curve},
    })


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    if not a or not b or a.get(key) is None or b.get(key) is None:
        return "n/a"
    return f"{a[key] / b[key]:.2f}x"


if __name__ == "__main__":
    main()
