"""How dW relates to W: Table 7, the amplification factor, Figure 8 (Hu et al. 2021, Sec. 7.3,
Appendix H.3-H.4).

    python -m analysis.amplification [SWEEP] [--layers 1,8,16,24] [--matrices q]
        [--out figures/<sweep>/amplification] [--wandb offline]

Takes the run with the lowest seed of each configuration (seeds are not averaged: every
number comes from one adapter, named in the column). A LoRA run of rank r gives one column
at r; a full fine-tuning run (dW = W_ft - W_0) one column at each LoRA rank found. W is the
frozen W_0 of the runs' base model (loaded once per distinct base). Writes, per matrix:

- ``table7_<m>.{md,tex,csv}``: for each chosen layer, ||U^T W V^T||_F with U, V the
  top-r singular directions of dW, of W and of a random matrix, ||W||_F, ||dW||_F and the
  amplification factor ||dW||_F / ||U^T W V^T||_F (U, V of dW);
- ``amplification_<m>.{png,pdf,csv}``: the amplification factor against the LoRA
  rank, one line per layer (every layer of the model);
- ``weight_similarity_<m>_layer<L>.{png,pdf,csv}`` (Figure 8): phi(W, dW, k, r),
  how much of dW's r directions lie in W's top-k right-singular directions, per run, each
  with its own random expectation max(k, r) / d_in (dashed, in the curve's colour).

Prints each Table 7 as Markdown.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from analysis import cli, linalg, plots, tables
from analysis.sweep_runs import (
    BaseWeights,
    Run,
    label,
    load_runs,
    lora_factors,
    lowest_seed_per_config,
    varying_keys,
)
from lora_repro.errors import UserError

COMMAND = "analysis.amplification"
FULL_TARGETS = "qkvo"  # the matrices `lora_repro.run_reader.delta_weights_of` gives for method=full
ROWS = ("dW", "W", "random", "norm_W", "norm_dW", "amplification")


@dataclass(frozen=True)
class Source:
    """A run whose dW is analysed, at the ranks `ranks`; `context` names what else varies."""

    run: Run
    ranks: tuple[int, ...]
    context: str

    def column(self, r: int) -> str:
        """Its Table 7 column at rank r: "r = 8", "FT, r = 8" (plus the context)."""
        head = f"r = {r}" if self.run.method == "lora" else f"FT, r = {r}"
        return f"{head}, {self.context}" if self.context else head


def find_sources(runs: Sequence[Run]) -> list[Source]:
    """The lowest-seed run of each configuration; LoRA runs first, by rank. A source's
    context lists the config keys that vary between runs of its method (besides rank)."""
    chosen = lowest_seed_per_config([r for r in runs if r.method in ("lora", "full")])
    lora = sorted((r for r in chosen if r.method == "lora"), key=lambda r: (r.rank, r.path))
    full = [r for r in chosen if r.method == "full"]
    if not lora:
        raise UserError("no complete LoRA run: Table 7 needs LoRA ranks to compare at")
    ranks = tuple(sorted({r.rank for r in lora}))
    sources = []
    for group, at in ((lora, None), (full, ranks)):
        context = varying_keys(group, ignore=["rank", "seed"])
        sources += [Source(r, at or (r.rank,), label(r, context, ", ")) for r in group]
    return sources


def shared_letters(sources: Sequence[Source]) -> str:
    """The matrices every source has a dW of (LoRA: its targets; full: q, k, v, o)."""
    letters = [s.run.targets if s.run.method == "lora" else FULL_TARGETS for s in sources]
    return "".join(m for m in FULL_TARGETS + "fp" if all(m in ls for ls in letters))


# ---------------------------------------------------------------- dW of each source


class Updates:
    """dW (d_out x d_in) of each source per (layer, letter), as an SVD computed once.

    LoRA: the exact SVD of (alpha / r) B A from the factors (`linalg.svd_of_product`);
    full fine-tuning: the SVD of W_ft - W_0 (`lora_repro.run_reader.delta_weights_of`).
    """

    def __init__(self):
        self._raw: dict = {}
        self._svd: dict = {}

    def read_lora(self, run: Run) -> int:
        """Read a LoRA run's factors now (cheap); return its model's layer count."""
        factors, meta = lora_factors(run)
        self._raw[run.path] = (factors, float(meta["alpha"]) / int(meta["rank"]))
        return int(meta["n_layer"])

    def svd(self, run: Run, layer: int, letter: str) -> linalg.SVD:
        """The SVD of the run's dW at (layer, letter), computed on first use."""
        key = (run.path, layer, letter)
        if key not in self._svd:
            self._svd[key] = self._decompose(run, layer, letter)
        return self._svd[key]

    def _decompose(self, run: Run, layer: int, letter: str) -> linalg.SVD:
        if run.method == "lora":
            factors, scaling = self._raw[run.path]
            a, b = factors[(layer, letter)]
            return linalg.svd_of_product(b * scaling, a)
        if run.path not in self._raw:
            from lora_repro.run_reader import delta_weights_of

            self._raw[run.path] = delta_weights_of(run.path)
        return linalg.svd(self._raw[run.path][(layer, letter)], f"dW of {run.path.name}")


def _generator() -> torch.Generator:
    """A fresh seeded generator per cell: the Random row does not depend on the order."""
    return torch.Generator().manual_seed(0)


# ---------------------------------------------------------------- Table 7 and figures


def _row_names(m: str) -> dict[str, str]:
    """Table 7's row labels for matrix `m`, by `linalg.projection_norms` key."""
    proj = f"‖UᵀW{m}Vᵀ‖F"
    return {"dW": f"{proj}, U, V of ΔW{m}", "W": f"{proj}, U, V of W{m}",
            "random": f"{proj}, U, V random", "norm_W": f"‖W{m}‖F", "norm_dW": f"‖ΔW{m}‖F",
            "amplification": f"‖ΔW{m}‖F / {proj}, U, V of ΔW{m}"}


def table7(sources: Sequence[Source], updates: Updates, base: BaseWeights,
           layers: Sequence[int], m: str) -> pd.DataFrame:
    """Table 7 for matrix `m`: rows (layer, quantity), one column per source and rank."""
    names, columns = _row_names(m), {}
    for source in sources:
        W = base(source.run)
        for r in source.ranks:
            columns[source.column(r)] = [
                linalg.projection_norms(W[(layer, m)], updates.svd(source.run, layer, m), r,
                                        _generator(), base.svd(source.run, layer, m))[key]
                for layer in layers for key in ROWS]
    index = pd.MultiIndex.from_tuples([(layer + 1, names[k]) for layer in layers for k in ROWS],
                                      names=["layer", ""])
    return pd.DataFrame(columns, index=index)


def amplification_curves(sources: Sequence[Source], updates: Updates, base: BaseWeights,
                         n_layer: int, m: str) -> dict[str, tuple[list[int], dict]]:
    """Per context: LoRA ranks and {"layer L": factor at each rank} for every layer."""
    curves: dict[str, tuple[list[int], dict]] = {}
    for source in (s for s in sources if s.run.method == "lora"):
        ranks, lines = curves.setdefault(source.context, ([], {}))
        ranks.append(source.run.rank)
        W = base(source.run)
        for layer in range(n_layer):
            factor = linalg.amplification_factor(W[(layer, m)],
                                                 updates.svd(source.run, layer, m),
                                                 source.run.rank)
            lines.setdefault(f"layer {layer + 1}", []).append(factor)
    return curves


def powers_of_two(d: int) -> list[int]:
    """1, 2, 4, ... up to d, and d itself: the k axis of Figure 8."""
    ks = [2**e for e in range(d.bit_length()) if 2**e <= d]
    return ks if ks[-1] == d else ks + [d]


def weight_similarity(sources: Sequence[Source], updates: Updates, base: BaseWeights,
                      layer: int, m: str) -> tuple[list[int], dict, dict]:
    """Figure 8 for one layer: ks, {column: phi(W, dW, k, r) per k} with r a LoRA run's
    rank (full fine-tuning: the largest rank), and {column: the random expectation
    max(k, r) / d_in per k} for that column's own r (it depends on r: 1/128 at k = 1 for
    r = 1 but 4/128 for r = 4 when d_in = 128)."""
    curves, baselines = {}, {}
    for source in sources:
        W = base.svd(source.run, layer, m)
        ks = powers_of_two(W.S.shape[0])
        r = max(source.ranks)
        phi = linalg.top_singular_similarity(W, updates.svd(source.run, layer, m), ks, r)
        column = source.column(r)
        curves[column] = phi.tolist()
        expected = linalg.expected_random_similarity_grid(max(ks), r, W.shape[1])[:, -1]
        baselines[column] = [float(expected[k - 1]) for k in ks]
    return ks, curves, baselines


def write_outputs(sources, updates, base, letters, layers, n_layer, out, sweep) -> list:
    """Table 7, the amplification plot and Figure 8 for each matrix; the paths written."""
    files = []
    for m in letters:
        table = table7(sources, updates, base, layers, m)
        stem = out / f"table7_{m}"
        files += [tables.write_table(table, stem.with_suffix(s), decimals=2)
                  for s in (".md", ".tex", ".csv")]
        print(f"Table 7, W{m} ({sweep}):\n{stem.with_suffix('.md').read_text()}")
        for context, (ranks, lines) in amplification_curves(sources, updates, base, n_layer,
                                                            m).items():
            name = "_".join(filter(None, ["amplification", m, context]))
            files += plots.plot_amplification(ranks, lines, out / name.replace(", ", "_"),
                                              title=f"How much ΔW{m} amplifies W{m}")
        for layer in cli.progress(layers, f"Figure 8, W{m}"):
            ks, curves, baselines = weight_similarity(sources, updates, base, layer, m)
            files += plots.plot_weight_similarity(
                ks, curves, out / f"weight_similarity_{m}_layer{layer + 1}", baselines,
                title=f"φ(W{m}, ΔW{m}): W{m}'s top-k directions vs ΔW{m}'s, layer {layer + 1}")
    return files


# ---------------------------------------------------------------- command


def run(args: argparse.Namespace) -> int:
    """The command: every check before loading models; returns the exit status."""
    sweep, runs = load_runs(args.sweep)
    sources = find_sources(runs)
    letters = cli.parse_matrices(args.matrices, shared_letters(sources), default="q")
    updates = Updates()
    n_layers = {updates.read_lora(s.run) for s in sources if s.run.method == "lora"}
    if len(n_layers) > 1:
        raise UserError(f"the runs have models of {sorted(n_layers)} layers; analyse one "
                        "model size at a time")
    n_layer = n_layers.pop()
    layers = cli.parse_layers(args.layers, n_layer)
    base = BaseWeights(letters)
    for source in cli.progress(sources, "base models"):
        base(source.run)
    files = write_outputs(sources, updates, base, letters, layers, n_layer,
                          cli.out_dir(args, sweep, "amplification"), sweep.name)
    return cli.finish(args, COMMAND, sweep, files, runs)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.base_parser(COMMAND, __doc__)
    cli.add_layer_arguments(parser, "q")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m analysis.amplification`: 0 on success, 2 with one `error:` line otherwise."""
    return cli.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
