"""Where a sweep's numbers come from: jobs, model, data, code, device, time, W&B group.

Read from the sweep directory alone: job dirs and their `summary.json` (complete) or only
`run_config.json` (incomplete), the `.failed/<job>` markers a failed job leaves, Hydra's
`multirun.yaml` (how many jobs the sweep asked for) and each job's `wandb/` folder.
"""

from __future__ import annotations

import math
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_repro import rundir

FAILED = ".failed"  # as lora_repro.train.FAILED (not imported: it loads Hydra and the trainer)
WANDB_URL = re.compile(r"https://wandb\.ai/([\w.-]+)/([\w.-]+)/runs/")


@dataclass
class Provenance:
    """What the report prints at its top; lists hold distinct values in first-seen order."""

    sweep: str
    complete: list[str]
    failed: dict[str, str]  # job -> its error line
    incomplete: list[str]
    expected: int | None  # jobs the sweep asked for (None: unknown)
    models: list[str] = field(default_factory=list)
    fingerprints: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    commits: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    compute_s: float = 0.0
    wandb_group: str | None = None

    @property
    def missing(self) -> int | None:
        """Jobs asked for that left no trace (no directory, no marker); None when unknown."""
        if self.expected is None:
            return None
        return max(0, self.expected - len(self.complete) - len(self.failed)
                   - len(self.incomplete))

    @property
    def on_gpu(self) -> bool:
        return any(d != "cpu" for d in self.devices)


def _distinct(values) -> list[str]:
    return list(dict.fromkeys(str(v) for v in values if v not in (None, "")))


def expected_jobs(sweep: Path) -> int | None:
    """The product of the comma lists in the sweep's overrides and sweeper params
    (multirun.yaml); None without the file or with another sweep syntax (range, glob)."""
    path = sweep / "multirun.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    hydra = OmegaConf.load(path).get("hydra", {})
    params = {str(k): str(v) for k, v in (hydra.get("sweeper", {}).get("params") or {}).items()}
    for override in hydra.get("overrides", {}).get("task", []) or []:
        key, _, value = str(override).partition("=")
        params[key.lstrip("+~")] = value
    if any("(" in value for value in params.values()):
        return None
    return math.prod(len(value.split(",")) for value in params.values())


def wandb_group_url(jobs: list[Path], group: str) -> str | None:
    """The W&B group page of an online sweep, from a job's W&B log naming its run URL."""
    for job in jobs:
        for log in sorted((job / "wandb").glob("run-*/logs/debug*.log")):
            found = WANDB_URL.search(log.read_text(errors="replace"))
            if found:
                return f"https://wandb.ai/{found[1]}/{found[2]}/groups/{group}"
    return None


def versions() -> dict[str, str]:
    """Python and the libraries the numbers depend on, as installed where the report runs."""
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "lora-repro"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def read(sweep: Path, runs) -> Provenance:
    """The provenance of a sweep and its complete runs (`analysis.sweep_runs.Run`)."""
    jobs = rundir.find_runs(sweep)
    failed = {p.name: p.read_text().strip().partition(": ")[2] or p.read_text().strip()
              for p in sorted((sweep / FAILED).glob("*"))}
    complete = [run.path.name for run in runs]
    incomplete = [j.name for j in jobs if j.name not in complete and j.name not in failed]
    configs = [run.config for run in runs]
    summaries = [run.summary for run in runs]
    run_versions = {k: v for s in summaries for k, v in (s.get("versions") or {}).items()}
    prov = Provenance(
        sweep=str(sweep), complete=complete, failed=failed, incomplete=incomplete,
        expected=expected_jobs(sweep),
        models=_distinct(f"{c['model'].get('id')} ({c['model'].get('name') or 'random init'})"
                         for c in configs),
        fingerprints=_distinct(s.get("base_fingerprint") for s in summaries),
        data=_distinct(_data(c["task"], s.get("train_examples"))
                       for c, s in zip(configs, summaries, strict=True)),
        commits=_distinct(s.get("git_commit") for s in summaries),
        devices=_distinct(s.get("device") for s in summaries),
        versions={**{f"{k} (runs)": v for k, v in run_versions.items()}, **versions()},
        compute_s=sum(float(s.get("wall_time_s") or 0) for s in summaries),
    )
    group = configs[0].get("name", sweep.name) if configs else sweep.name
    prov.wandb_group = wandb_group_url([run.path for run in runs], group)
    return prov


def _data(task: dict, examples) -> str:
    """"e2e (../shared/data/e2e: devset.csv, 4,200 training examples)"."""
    where = [task.get("data_dir") or "", task.get("train_file") or ""]
    detail = ": ".join(w for w in where if w)
    if examples:
        detail = ", ".join(filter(None, [detail, f"{examples:,} training examples"]))
    return f"{task.get('name')} ({detail})" if detail else str(task.get("name"))
