"""Fine-tune GPT-2 with LoRA: the Hydra entry point.

    python -m lora_repro.train +experiment=smoke                       # offline demo, CPU
    python -m lora_repro.train -m rank=1,2,4,8,64 targets=qv,qkvo      # a sweep, 10 jobs
    python -m lora_repro.train model=gpt2 task=webnlg rank=8 seed=2    # one run

Each job writes `runs/<name>/<job>/` (see `lora_repro.rundir`), with <job> such as
`r8-qv-s1`, plus any other overridden keys. Rerunning the same command resumes an
interrupted job and skips a complete one.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lora_repro.config import TrainConfig, register, validate
from lora_repro.errors import UserError

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "task", "experiment")


def job_name(method: str, rank: int, targets: str, seed: int, overrides: str = "") -> str:
    """A readable job directory name: `r8-qv-s1`, `full-s1`, plus other overrides such as
    `_lr-0.001` (characters that are unsafe in paths become `-`)."""
    name = f"full-s{seed}" if method == "full" else f"r{rank}-{targets}-s{seed}"
    if overrides:
        extra = re.sub(r"[^A-Za-z0-9.,_+-]", "-", overrides)
        if len(extra) > 80:  # keep names readable and under path limits; the hash keeps them unique
            extra = f"{extra[:60]}-{hashlib.sha1(overrides.encode()).hexdigest()[:8]}"
        name += "_" + extra
    return name


def check_choices(args: list[str]) -> None:
    """One clear line for an unknown config group option (Hydra's own error is a page)."""
    for arg in args:
        m = re.fullmatch(r"\+?(model|task|experiment)=(.*)", arg)
        if not m:
            continue
        group, values = m.groups()
        allowed = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        for value in values.split(","):
            if value not in allowed:
                raise UserError(
                    f"{group}={value!r} is not an option; allowed: {', '.join(allowed)}"
                )


OmegaConf.register_new_resolver("job_name", job_name, replace=True)
register()


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def _run(dict_cfg: DictConfig) -> float | None:
    try:
        cfg: TrainConfig = validate(OmegaConf.to_object(dict_cfg))
        from lora_repro.trainer import train  # heavy imports after validation

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        summary = train(cfg, run_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(result_line(run_dir, summary))
    return summary["metrics"].get("val_loss")


def result_line(run_dir: Path, summary: dict) -> str:
    """`runs/smoke/r4-qv-s1: val_loss 6.0110, BLEU 0.0000, ... (19 s)`: the job's final line."""
    first = ["val_loss", "BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    found = summary["metrics"]
    keys = [k for k in first if k in found] + sorted(set(found) - set(first) - {"val_ppl"})
    metrics = ", ".join(f"{k} {found[k]:.4f}" for k in keys)
    return f"{run_dir}: {metrics} ({summary['wall_time_s']:.0f} s)"


def main() -> None:
    try:
        check_choices(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _run()


if __name__ == "__main__":
    main()
