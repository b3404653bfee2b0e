"""Metrics out of the loop: `metrics.jsonl` in the run directory, mirrored to W&B.

W&B mode: `logger.wandb.mode` if set, else `WANDB_MODE` from the environment, else online
when an API key is configured and offline otherwise, so a run never crashes or prompts for
a login. One W&B run per job, grouped by sweep (`name`), named as the job directory, with a
stable id so a resumed job continues the same W&B run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from lora_repro.config import WandbConfig
from lora_repro.rundir import METRICS


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # older wandb without prompt=, or no credentials store
        return False


def wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode:
        return cfg.mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    return "online" if _has_api_key() else "offline"


def _step(line: str) -> float:
    """A metrics line's step; a line cut short by a kill (always past the checkpoint) is inf."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


class Tracker:
    """Append metrics to `metrics.jsonl` (and W&B); on resume, drop lines past `resume_step`."""

    def __init__(
        self,
        run_dir: Path,
        wandb_cfg: WandbConfig,
        config: dict,
        group: str,
        resume_step: int | None = None,
    ):
        self.path = Path(run_dir) / METRICS
        kept = []
        if resume_step is not None and self.path.is_file():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if _step(line) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.run = None
        mode = wandb_mode(wandb_cfg)
        if mode != "disabled":
            import wandb

            run_dir = Path(run_dir).resolve()
            self.run = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                mode=mode,
                dir=str(run_dir),
                group=group,
                name=run_dir.name,
                id=hashlib.sha1(str(run_dir).encode()).hexdigest()[:16],
                resume="allow",
                reinit="create_new",  # a pack of jobs (packed_trainer) logs K runs at once
                config=config,
                settings=wandb.Settings(silent=True, console="off"),
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        with self.path.open("a") as f:
            # "time" (unix seconds) lets bench.sweep line up the jobs of a sweep
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            flat = {k: v for k, v in values.items() if isinstance(v, (int, float, str))}
            self.run.summary.update(flat)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
