"""A sweep's runs, for the analysis commands: find, check, load, pair and label them.

A thin edge over `lora_repro.rundir` (layout, writing, checksums) and `lora_repro.run_reader`
(reading one job back: adapters, base models, dW). A run's configuration is
`summary.json["config"]`. A job that failed (a marker in `<sweep>/.failed/`) or is
incomplete (no `summary.json`) is skipped with one warning line naming it; a complete job
whose files differ from their checksums is an error. A peft adapter directory in the sweep
is a LoRA run too (`peft_runs`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from analysis import linalg
from lora_repro import rundir
from lora_repro.errors import UserError

RUNS_ROOT = Path("runs")
# How a varying config key is written in file names and labels: seed 1 -> "s1".
SHORT = {"rank": "r{}", "seed": "s{}", "targets": "{}", "method": "{}", "model.id": "{}",
         "task.name": "{}"}


@dataclass(frozen=True)
class Run:
    """One complete job directory and its `summary.json`."""

    path: Path
    summary: dict

    @property
    def config(self) -> dict:
        return self.summary["config"]

    @property
    def method(self) -> str:
        return self.config.get("method", "lora")

    @property
    def rank(self) -> int:
        return int(self.config["rank"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def targets(self) -> str:
        return self.config["targets"]

    @cached_property
    def identity(self) -> dict[str, Any]:
        """The config as dotted keys, without the keys that do not change a run's result."""
        return rundir.flat_identity(self.config)


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------- finding and loading


def newest_sweep(root: Path = RUNS_ROOT) -> Path:
    """The most recently modified directory directly under `root` that holds job dirs."""
    candidates = [p for p in Path(root).glob("*/") if p.is_dir() and rundir.find_runs(p)]
    if not candidates:
        raise UserError(f"no sweep directory given and {root}/ holds no run directories; "
                        "pass one, e.g. runs/subspace_fig3")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def load_runs(sweep: Path | None) -> tuple[Path, list[Run]]:
    """The sweep directory (default: `newest_sweep()`) and its complete runs, sorted by path.

    Warns once per failed job (its `.failed/` marker) and per other incomplete job
    directory; raises `UserError` when none is complete, or naming a complete job's file
    that differs from its checksum in summary.json.
    """
    sweep = newest_sweep() if sweep is None else Path(sweep)
    if not sweep.is_dir():
        raise UserError(f"sweep directory {sweep} does not exist")
    runs, failed = peft_runs(sweep), {}
    for marker in rundir.failed_markers(sweep):
        failed[marker.name] = marker.read_text().strip()
    for job in rundir.find_runs(sweep):
        if (job / rundir.SUMMARY).is_file():
            summary = rundir.read_json(job / rundir.SUMMARY)
            rundir.verify_artifacts(job, summary)
            runs.append(Run(job, summary))
            failed.pop(job.name, None)  # failed once, since rerun to completion
        elif job.name not in failed:
            warn(f"missing {job}: incomplete (no {rundir.SUMMARY}); rerun its command to "
                 "resume it")
    for line in failed.values():
        warn(f"missing {sweep}/{line.split(': ', 1)[0]}: failed ({line.split(': ', 1)[-1]})")
    if not runs:
        raise UserError(f"{sweep} holds no complete run (a job directory with {rundir.SUMMARY})")
    return sweep, sorted(runs, key=lambda run: run.path)


def peft_runs(sweep: Path) -> list[Run]:
    """The peft adapter directories below `sweep` as LoRA runs, their config made by
    `lora_repro.run_reader.peft_summary` (an export pairs with its source run's sweep)."""
    # imports transformers: only when needed
    from lora_repro.run_reader import peft_dirs, peft_summary

    return [Run(path, peft_summary(path)) for path in peft_dirs(sweep)]


def lora_runs(runs: Iterable[Run]) -> list[Run]:
    """The runs with method=lora."""
    return [run for run in runs if run.method == "lora"]


# ---------------------------------------------------------------- pairing and labels


def _key_without(run: Run, keys: Sequence[str]) -> str:
    """The run's identity without `keys`, as a string: equal for runs differing only there."""
    return json.dumps({k: v for k, v in run.identity.items() if k not in keys},
                      sort_keys=True, default=str)


def groups_differing_in(runs: Sequence[Run], key: str) -> list[list[Run]]:
    """Runs grouped so that runs of a group differ only in `key` (config key, e.g. "rank").

    Each group is sorted by `key` and holds at least two runs; groups are in path order.
    """
    by_rest: dict[str, list[Run]] = {}
    for run in runs:
        if key in run.identity:  # full fine-tuning runs have no rank
            by_rest.setdefault(_key_without(run, [key]), []).append(run)
    groups = [sorted(g, key=lambda r: r.identity[key]) for g in by_rest.values() if len(g) > 1]
    return sorted(groups, key=lambda g: g[0].path)


def pick_pairs(groups: Sequence[list[Run]], key: str,
               choose: Callable[[list[Any]], tuple[Any, Any] | None]) -> list[tuple[Run, Run]]:
    """One pair per group: `choose` gets the group's sorted `key` values and returns the two
    to compare (or None to skip the group)."""
    pairs = []
    for group in groups:
        values = [run.identity[key] for run in group]
        chosen = choose(values)
        if chosen is not None:
            pairs.append(tuple(group[values.index(v)] for v in chosen))
    return pairs


def lowest_seed_per_config(runs: Sequence[Run]) -> list[Run]:
    """From runs that differ only in seed, the one with the lowest seed; in path order."""
    keyed = sorted(runs, key=lambda r: (_key_without(r, ["seed"]), r.seed))
    return sorted((next(g) for _, g in groupby(keyed, lambda r: _key_without(r, ["seed"]))),
                  key=lambda r: r.path)


def varying_keys(runs: Sequence[Run], ignore: Sequence[str] = ()) -> list[str]:
    """Dotted config keys whose values differ between the runs (in first-seen order)."""
    keys: dict[str, None] = {}
    for run in runs:
        keys |= dict.fromkeys(run.identity)
    return [k for k in keys if k not in ignore
            and len({json.dumps(r.identity.get(k), default=str) for r in runs}) > 1]


def label(run: Run, keys: Sequence[str], sep: str = "_") -> str:
    """The values of `keys` for a run, short: ["rank", "seed", "lr"] -> "r8_s1_lr-0.001"."""
    parts = []
    for key in keys:
        value = run.identity.get(key)
        fmt = SHORT.get(key, f"{key.rsplit('.', 1)[-1]}-{{}}")
        parts.append(fmt.format(value))
    return sep.join(parts)


# ---------------------------------------------------------------- weights


def lora_factors(run: Run) -> tuple[dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                                    dict]:
    """A (r x d_in), B (d_out x r) per (0-based layer, letter), and the adapter metadata."""
    from lora_repro.run_reader import lora_factors_of  # imports transformers: only when needed

    return lora_factors_of(run.path)


def base_model_key(run: Run) -> str:
    """Runs with equal keys share their base W_0: the model config, plus the task for a
    tokenizer trained on it (its vocabulary sizes a random-init model's embedding)."""
    model = run.config["model"]
    task = run.config["task"] if model.get("tokenizer") == "bpe" else None
    return json.dumps([model, task], sort_keys=True, default=str)


class BaseWeights:
    """A run's frozen W_0 (d_out x d_in) per (layer, letter) of `letters`, and its SVDs:
    one base model load per distinct base (`base_model_key`), one SVD per matrix."""

    def __init__(self, letters: str):
        self.letters = letters
        self._weights: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
        self._fingerprints: dict[str, str] = {}
        self._svds: dict[tuple[str, int, str], linalg.SVD] = {}

    def __call__(self, run: Run) -> dict[tuple[int, str], torch.Tensor]:
        key = base_model_key(run)
        if key not in self._weights:
            from lora_repro.lora import base_weights
            from lora_repro.modeling import base_fingerprint
            from lora_repro.run_reader import base_model

            model = base_model(run.path)
            self._fingerprints[key] = base_fingerprint(model)
            weights = base_weights(model, targets=self.letters)
            # float64 and contiguous once, the precision `linalg` works in on the CPU
            self._weights[key] = {k: w.double().contiguous() for k, w in weights.items()}
        trained_on = run.summary.get("base_fingerprint")
        if trained_on not in (None, self._fingerprints[key]):
            raise UserError(f"{run.path} was trained on another base than model.name="
                            f"{run.config['model']['name']!r} holds now (weights differ); "
                            "W vs dW needs the original base")
        return self._weights[key]

    def svd(self, run: Run, layer: int, letter: str) -> linalg.SVD:
        key = (base_model_key(run), layer, letter)
        if key not in self._svds:
            self._svds[key] = linalg.svd(self(run)[(layer, letter)], f"W{letter}")
        return self._svds[key]
