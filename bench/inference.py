"""Inference benchmark: one forward of the base, the unmerged LoRA and the merged model
(batch 1, length 128, median of many), and beam-10 decoding of the 630 E2E test MRs with the
official decoder (`lora_repro.beam_search`) and with transformers' `generate` (`eval.decoder=hf`).

    python -m bench.inference            # GPU: GPT-2 Medium shape
    python -m bench.inference --tiny     # CPU smoke test of the script itself
"""

from __future__ import annotations

import time

import torch

from bench import common
from lora_repro.decoding import beam_decode
from lora_repro.lora import apply_lora, lora_factors, merge_lora


def main(argv=None) -> None:
    parser = common.arguments(__doc__.splitlines()[0])
    parser.add_argument("--decode-batch", type=int, default=64)
    args = parser.parse_args(argv)
    tokenizer, shape, _, sources, device = common.setup(args, test=True)
    repeats, length = (5, 16) if args.tiny else (200, 128)
    bf16 = device.type == "cuda"
    model = common.base_model(shape, tokenizer, device).eval()
    ids = torch.randint(0, len(tokenizer), (1, length), device=device)

    @torch.no_grad()
    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(ids)

    rows = [{"setup": "base model", "ms": common.median_ms(forward, device, repeats)}]
    apply_lora(model, "qv", 4, 32.0)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for _, b in lora_factors(model).values():
            b.normal_(std=0.02)
    unmerged = common.median_ms(forward, device, repeats)
    rows.append({"setup": "LoRA qv r=4, unmerged", "ms": unmerged})
    merge_lora(model)
    rows.append({"setup": "LoRA qv r=4, merged", "ms": common.median_ms(forward, device, repeats)})
    for row in rows:
        row["vs_base"] = row["ms"] / rows[0]["ms"]

    n = 8 if args.tiny else len(sources)
    decode_s = {}
    for decoder in ("official", "hf"):
        common.sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = beam_decode(model, tokenizer, sources[:n], beam=10, length_penalty=0.9,
                                  no_repeat_ngram_size=4, max_new_tokens=64,
                                  batch_size=args.decode_batch, max_prompt_length=512,
                                  device=device, decoder=decoder)
        common.sync(device)
        decode_s[decoder] = time.perf_counter() - t0
    notes = [f"Forward: batch 1, length {length}, bf16 autocast on CUDA, median of {repeats}. "
             f"Decoding: {len(outputs)} test MRs, beam 10, no-repeat 4-grams, at most 64 new "
             f"tokens, batches of {args.decode_batch} MRs, merged model: "
             f"{decode_s['official']:.1f} s with the official decoder, {decode_s['hf']:.1f} s "
             "with transformers' generate (a random adapter never ends an output, so every "
             "batch runs all 64 steps)."]
    common.save("inference", args, {
        "title": "Inference (GPT-2 Medium shape)",
        "command": "python -m bench.inference" + (" --tiny" if args.tiny else ""),
        "environment": common.environment(device), "notes": notes,
        "decode_s": decode_s["official"], "decode_hf_s": decode_s["hf"],
        "tables": [{"columns": [("setup", "forward", "s"), ("ms", "ms", ".2f"),
                                ("vs_base", "vs base", ".3f")], "rows": rows}],
    })


if __name__ == "__main__":
    main()
