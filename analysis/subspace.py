"""Subspace similarity between LoRA runs: Figures 3, 4, 6 and 7 of Hu et al. 2021.

    python -m analysis.subspace [SWEEP] [--layers 1,8,16,24] [--matrices q,v]
        [--ranks 8,64] [--seeds 1,2] [--zoom 8] [--out figures/<sweep>/subspace]
        [--wandb offline]

Pairs complete LoRA runs that differ only in rank (default: r = 8 against r = 64 as in the
paper where a group has both, else its smallest against its largest rank) and runs that
differ only in seed (default: the two lowest seeds at each rank). For each pair, chosen
layer and matrix, phi(A1, A2, i, j) of Eq. 4 (Section 7.2) is computed on the
right-singular vectors of the two A matrices (one SVD per matrix), and:

- a rank pair gives Figure 3 per layer (full i x j grid and the zoom i, j <= --zoom) and
  Figure 6 per matrix (the chosen layers side by side, Appendix H.1);
- a seed pair gives Figure 4 per layer (beside a random Gaussian pair of the same shapes)
  and Figure 7 per matrix.

Files: ``<out>/<pair>_layer<L>.{png,pdf}`` (L 1-based) and ``<out>/<pair>_layers_<matrix>
.{png,pdf}``, with a CSV per grid beside them. Prints (and writes as ``phi_top`` and
``phi_seed_block`` .md, .csv) phi(A_small, A_large, 1, 1) per layer and matrix, and the mean
phi over the top-left zoom x zoom block of each seed pair against the random pair.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from analysis import cli, linalg, plots, tables
from analysis.sweep_runs import (
    Run,
    groups_differing_in,
    label,
    load_runs,
    lora_factors,
    lora_runs,
    pick_pairs,
    varying_keys,
)
from lora_repro.errors import UserError

COMMAND = "analysis.subspace"
RANDOM_SEED = 0  # the random Gaussian pair of Figure 4
PAPER_RANKS = (8, 64)  # Figure 3's pair


@dataclass(frozen=True)
class Pair:
    """Two runs that differ only in `kind` ("rank" or "seed"); `name` labels files."""

    kind: str
    a: Run
    b: Run
    name: str


# ---------------------------------------------------------------- choosing pairs


def _chooser(wanted: tuple[int, int] | None, kind: str):
    """Which two values of a group to compare: `wanted`; else for ranks the paper's 8 and 64
    where the group has both, otherwise its smallest and largest; for seeds the two lowest."""
    def choose(values: list[int]) -> tuple[int, int] | None:
        if wanted is not None:
            return wanted if set(wanted) <= set(values) else None
        if kind == "rank":
            pick = PAPER_RANKS if set(PAPER_RANKS) <= set(values) else (values[0], values[-1])
        else:
            pick = (values[0], values[1])
        return pick if pick[0] != pick[1] else None
    return choose


def find_pairs(runs: Sequence[Run], kind: str, wanted: tuple[int, int] | None) -> list[Pair]:
    """Pairs of LoRA runs differing only in `kind`, named "r8_vs_r64_s1" / "r64_s1_vs_s2"
    (the context lists the other config keys that vary between the pairs' groups)."""
    groups = groups_differing_in(lora_runs(runs), kind)
    context = varying_keys([run for group in groups for run in group], ignore=[kind])
    pairs = []
    for a, b in pick_pairs(groups, kind, _chooser(wanted, kind)):
        here = label(a, context)
        if kind == "rank":
            name = "_".join(filter(None, [f"r{a.rank}_vs_r{b.rank}", here]))
        else:
            name = "_".join(filter(None, [here, f"s{a.seed}_vs_s{b.seed}"]))
        pairs.append(Pair(kind, a, b, name))
    if wanted is not None and not pairs:
        raise UserError(f"--{kind}s {wanted[0]},{wanted[1]}: no two complete LoRA runs differ "
                        f"only in {kind} with those values")
    return pairs


def choose_pairs(runs: Sequence[Run], args: argparse.Namespace) -> list[Pair]:
    """Rank pairs then seed pairs; `UserError` when there are none at all."""
    ranks, seeds = cli.parse_pair(args.ranks, "ranks"), cli.parse_pair(args.seeds, "seeds")
    pairs = find_pairs(runs, "rank", ranks) + find_pairs(runs, "seed", seeds)
    if not pairs:
        raise UserError("no two complete LoRA runs differ only in rank or only in seed; "
                        "a sweep such as +experiment=subspace_fig3 (rank=8,64 seed=1,2) has them")
    for kind, figures in (("rank", "3 and 6"), ("seed", "4 and 7")):
        if not any(p.kind == kind for p in pairs):
            print(f"note: no runs differ only in {kind}; skipping Figures {figures}",
                  file=sys.stderr)
    return pairs


def shared_targets(pairs: Sequence[Pair]) -> str:
    """The matrix letters every paired run adapted, in canonical order."""
    runs = [run for p in pairs for run in (p.a, p.b)]
    return "".join(m for m in runs[0].targets if all(m in run.targets for run in runs))


# ---------------------------------------------------------------- computing


def read_factors(pairs: Sequence[Pair]) -> tuple[dict, int]:
    """A of every paired run per (layer, letter), by run path; and the models' layer count."""
    runs = {run.path: run for p in pairs for run in (p.a, p.b)}
    factors, n_layers = {}, set()
    for path, run in cli.progress(runs.items(), "adapters", len(runs)):
        ab, meta = lora_factors(run)
        factors[path] = {key: a for key, (a, _) in ab.items()}
        n_layers.add(int(meta["n_layer"]))
    if len(n_layers) > 1:
        raise UserError(f"the paired runs have models of {sorted(n_layers)} layers; "
                        "analyse one model size at a time")
    return factors, n_layers.pop()


def similarity_grids(pairs: Sequence[Pair], layers: Sequence[int], letters: str,
                     factors: dict) -> dict[tuple[int, int, str], torch.Tensor]:
    """phi(A_a, A_b, i, j) per (pair index, 0-based layer, letter); each A decomposed once."""
    svds: dict = {}

    def svd_of(run: Run, layer: int, letter: str) -> linalg.SVD:
        key = (run.path, layer, letter)
        if key not in svds:
            svds[key] = linalg.svd(factors[run.path][(layer, letter)], f"A of {run.path.name}")
        return svds[key]

    cells = [(n, layer, m) for n in range(len(pairs)) for layer in layers for m in letters]
    return {(n, layer, m): linalg.subspace_similarity_grid(svd_of(pairs[n].a, layer, m),
                                                           svd_of(pairs[n].b, layer, m))
            for n, layer, m in cli.progress(cells, "phi grids")}


def random_grid(pair: Pair, letter: str, factors: dict) -> torch.Tensor:
    """Eq. 4 between two Gaussian matrices shaped like the pair's A matrices (Figure 4)."""
    (r1, d_in), (r2, _) = (factors[run.path][(0, letter)].shape for run in (pair.a, pair.b))
    return _random_grid(r1, r2, d_in)


@functools.cache
def _random_grid(r1: int, r2: int, d_in: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(RANDOM_SEED)
    return linalg.random_subspace_similarity_grid(r1, r2, d_in, generator)


# ---------------------------------------------------------------- writing


def write_figures(pairs: Sequence[Pair], grids: dict, layers: Sequence[int], letters: str,
                  factors: dict, out, zoom: int) -> list:
    """Figures 3/4 per pair and layer, Figures 6/7 per pair and matrix; the paths written."""
    files = []
    jobs = [(n, layer) for n in range(len(pairs)) for layer in layers]
    for n, layer in cli.progress(jobs, "figures"):
        pair = pairs[n]
        panels = {f"{cli.matrix_title(m)}, layer {layer + 1}": grids[(n, layer, m)]
                  for m in letters}
        path = out / f"{pair.name}_layer{layer + 1}"
        if pair.kind == "rank":
            files += plots.plot_rank_similarity(panels, path, zoom=zoom)
        else:
            files += plots.plot_seed_similarity(panels, random_grid(pair, letters[0], factors),
                                                path)
    for n, pair in enumerate(pairs):
        for m in letters:
            across = {cli.matrix_title(m): {layer: grids[(n, layer, m)] for layer in layers}}
            path = out / f"{pair.name}_layers_{m}"
            files += plots.plot_layer_similarity(across, path)
    return files


def summary_tables(pairs: Sequence[Pair], grids: dict, layers: Sequence[int], letters: str,
                   factors: dict, zoom: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """phi(A_small, A_large, 1, 1) per rank pair and layer (a column per matrix); and the
    mean phi over the top-left zoom x zoom block per seed pair and layer, with the random
    pair's mean in a last column."""
    top, block = [], []
    for n, pair in enumerate(pairs):
        for layer in layers:
            row = {"pair": pair.name, "layer": layer + 1}
            if pair.kind == "rank":
                top.append(row | {m: float(grids[(n, layer, m)][0, 0]) for m in letters})
            else:
                means = {m: float(grids[(n, layer, m)][:zoom, :zoom].mean()) for m in letters}
                rand = {m: float(random_grid(pair, m, factors)[:zoom, :zoom].mean())
                        for m in letters}
                if len({factors[pair.a.path][(0, m)].shape[1] for m in letters}) == 1:
                    rand = {"random": rand[letters[0]]}  # one d_in (q k v o f): one column
                else:  # p's d_in is 4 d_model: its own baseline
                    rand = {f"random {m}": value for m, value in rand.items()}
                block.append(row | means | rand)
    return (pd.DataFrame(top).set_index(["pair", "layer"]) if top else pd.DataFrame(),
            pd.DataFrame(block).set_index(["pair", "layer"]) if block else pd.DataFrame())


def print_summary(top: pd.DataFrame, block: pd.DataFrame, zoom: int) -> None:
    """The two `summary_tables` on stdout, three decimals."""
    if not top.empty:
        print("phi(A_small, A_large, 1, 1): does the top direction of the small rank lie in "
              "the large rank's subspace? (1 = yes)")
        print(top.to_string(float_format="{:.3f}".format), end="\n\n")
    if not block.empty:
        print(f"mean phi over i, j <= {zoom}: two seeds at one rank against a random "
              "Gaussian pair")
        print(block.to_string(float_format="{:.3f}".format))


# ---------------------------------------------------------------- command


def run(args: argparse.Namespace) -> int:
    """The command: every check before the SVDs and figures; returns the exit status."""
    sweep, runs = load_runs(args.sweep)
    pairs = choose_pairs(runs, args)
    letters = cli.parse_matrices(args.matrices, shared_targets(pairs))
    if args.zoom < 1:
        raise UserError(f"--zoom={args.zoom}: must be >= 1")
    factors, n_layer = read_factors(pairs)
    layers = cli.parse_layers(args.layers, n_layer)
    grids = similarity_grids(pairs, layers, letters, factors)
    out = cli.out_dir(args, sweep, "subspace")
    files = write_figures(pairs, grids, layers, letters, factors, out, args.zoom)
    top, block = summary_tables(pairs, grids, layers, letters, factors, args.zoom)
    for stem, table in (("phi_top", top), ("phi_seed_block", block)):
        if not table.empty:
            files += [tables.write_table(table, out / f"{stem}{suffix}", decimals=3)
                      for suffix in (".md", ".csv")]
    print_summary(top, block, args.zoom)
    return cli.finish(args, COMMAND, sweep, files, runs)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.base_parser(COMMAND, __doc__)
    cli.add_layer_arguments(parser, "the targets all paired runs share")
    parser.add_argument("--ranks", help="compare these two ranks, e.g. 8,64 "
                        "(default: 8,64 where present, else smallest vs largest)")
    parser.add_argument("--seeds", help="compare these two seeds, e.g. 1,2 "
                        "(default: the two lowest)")
    parser.add_argument("--zoom", type=int, default=8,
                        help="the zoomed corner of Figure 3 and the summary block (default: 8)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m analysis.subspace`: 0 on success, 2 with one `error:` line otherwise."""
    return cli.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
