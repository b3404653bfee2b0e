"""Time the paper's analysis on a GPT-2 Medium-sized model (24 layers, d_model 1024).

    python -m bench.analysis_grid                   # CPU: GPT-2 Medium shape, 24 layers, d 1024
    python -m bench.analysis_grid --device cuda     # the same on the GPU
    python -m bench.analysis_grid --tiny            # CPU smoke test: 2 layers, d 128

Random matrices stand in for trained adapters (the math costs the same). For each of
layers x {Wq, Wv} it times, separately:
  fig3   phi(A_r=8, A_r=64) grids (Section 7.2, Figure 3), one SVD per A
  fig4   phi(A_r=64 seed 1, A_r=64 seed 2) grids (Figure 4)
  table7 projection norms and amplification for r = 1, 2, 4, 8, 64 (Table 7, App. H.4),
         dW from its LoRA factors (`svd_of_product`), W decomposed once per matrix
  fig8   phi(W top-k, dW top-r) for r = 4, 8, 64 (Appendix H.3), same W decomposition
  erank  effective rank of a dense (full fine-tuning) dW, singular values only
Prints seconds per stage and in total (one pass over every matrix; inputs are drawn before
the clock starts) and writes them to `bench/results/analysis_grid.json`
(`bench.common.save`; full size: also `bench/RESULTS.md`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from analysis import linalg as L
from bench import common

RANKS = (1, 2, 4, 8, 64)
FIG8_RANKS = (4, 8, 64)
FULL, TINY = (24, 1024), (2, 128)  # (layers, d): GPT-2 Medium's shape; the smoke test's


def make_inputs(layers: int, d: int, device: str, seed: int = 0) -> list[dict]:
    """Per (layer, matrix): W (d, d), A_r=8, two A_r=64 and LoRA factors for each rank."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g).to(device)  # float32, like weights
    return [
        {
            "W": randn(d, d),
            "A8": randn(8, d),
            "A64": randn(64, d),
            "A64_seed2": randn(64, d),
            "factors": {r: (randn(d, r) * 1e-2, randn(r, d)) for r in RANKS},
            "dense_dW": randn(d, d) * 1e-3,
        }
        for _ in range(2 * layers)
    ]


def fig3(m: dict) -> None:
    L.subspace_similarity_grid(m["A8"], m["A64"])


def fig4(m: dict) -> None:
    L.subspace_similarity_grid(m["A64"], m["A64_seed2"])


def table7_and_fig8(m: dict) -> None:
    W_svd = L.svd(m["W"], "W")
    d = m["W"].shape[0]
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if k < d} | {d})
    for r, (B, A) in m["factors"].items():
        dW = L.svd_of_product(B, A)
        L.projection_norms(m["W"], dW, r, W_svd=W_svd)
        if r in FIG8_RANKS:
            L.top_singular_similarity(W_svd, dW, ks, r)


def erank(m: dict) -> None:
    S = torch.linalg.svdvals(m["dense_dW"].double() if m["dense_dW"].is_cpu else m["dense_dW"])
    L.effective_rank(S)
    L.effective_rank(S, "energy")


STAGES = {  # name -> (function, what it computes per matrix)
    "fig3": (fig3, "phi(A_r=8, A_r=64) grid (Figure 3)"),
    "fig4": (fig4, "phi(A_r=64, seed 1 vs 2) grid (Figure 4)"),
    "table7+fig8": (table7_and_fig8,
                    "Table 7 + amplification at r = 1, 2, 4, 8, 64; Figure 8 at r = 4, 8, 64"),
    "erank": (erank, "effective rank of a dense dW (full fine-tuning)"),
}


def timed(stage: Callable[[dict], None], inputs: list[dict], device: str) -> float:
    start = time.perf_counter()
    for m in inputs:
        stage(m)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help=f"CPU, {TINY[0]} layers, d {TINY[1]}, seconds (a smoke test)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=None, help=f"default {FULL[0]}")
    parser.add_argument("--d", type=int, default=None, help=f"default {FULL[1]}")
    parser.add_argument("--out", default=None,
                        help="results JSON (default bench/results/analysis_grid.json)")
    args = parser.parse_args(argv)
    if args.tiny and args.device != "cpu":
        parser.error("--tiny runs on the CPU; leave out --device")
    args.command = " ".join(["python -m bench.analysis_grid"] + ["--tiny"] * args.tiny + [
        f"--{k} {v}" for k, v in (("device", args.device), ("layers", args.layers),
                                  ("d", args.d)) if v not in (None, "cpu")])
    layers, d = TINY if args.tiny else FULL
    args.layers, args.d = args.layers or layers, args.d or d
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Time each stage; print, save and return seconds per stage."""
    args = parse(argv)
    inputs = make_inputs(args.layers, args.d, args.device)
    timed(fig3, inputs[:1], args.device)  # warm-up (lazy LAPACK / cuSOLVER init)
    device = torch.device(args.device)
    setting = f"{len(inputs)} matrices ({args.layers} layers x Wq, Wv), d = {args.d}"
    print(f"{setting}, {common.device_name(device)}")
    seconds = {}
    for name, (stage, _) in STAGES.items():
        seconds[name] = timed(stage, inputs, args.device)
        print(f"{name:12s} {seconds[name]:8.3f} s")
    print(f"{'total':12s} {sum(seconds.values()):8.3f} s")
    rows = [{"stage": name, "what": what, "s": seconds[name],
             "ms_per_matrix": 1e3 * seconds[name] / len(inputs)}
            for name, (_, what) in STAGES.items()]
    rows.append({"stage": "total", "what": "", "s": sum(seconds.values()),
                 "ms_per_matrix": 1e3 * sum(seconds.values()) / len(inputs)})
    common.save("analysis_grid", args, {
        "title": f"Analysis grid ({args.layers} layers x Wq, Wv, d = {args.d})",
        "command": args.command, "environment": common.environment(device),
        "notes": [f"{setting}. Random matrices stand in for trained adapters (the math costs "
                  "the same); float32 inputs, float64 math on the CPU. One pass over every "
                  "matrix after a one-matrix warm-up; inputs drawn before the clock starts."],
        "tables": [{"columns": [("stage", "stage", "s"), ("what", "computes, per matrix", "s"),
                                ("s", "seconds", ".2f"),
                                ("ms_per_matrix", "ms per matrix", ".1f")], "rows": rows}],
    })
    return seconds


if __name__ == "__main__":
    main()
