"""Fine-tune GPT-2 with LoRA: the Hydra entry point.

    python -m lora_repro.train +experiment=smoke                       # offline demo, CPU
    python -m lora_repro.train -m rank=1,2,4,8,64 targets=qv,qkvo      # a sweep, 10 jobs
    python -m lora_repro.train model=gpt2 task=webnlg rank=8 seed=2    # one run

Each job writes `runs/<name>/<job>/` (see `lora_repro.rundir`), with <job> such as
`r8-qv-s1`, plus any other overridden keys. Rerunning the same command resumes an
interrupted job and skips a complete one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, OmegaConfBaseException

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


def _fields(key: str) -> list[str]:
    """The config keys beside dotted `key` ("model.n_layr" -> ModelConfig's fields)."""
    node = TrainConfig()
    for part in key.split(".")[:-1]:
        node = getattr(node, part, None)
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _compose_error(e: Exception) -> UserError:
    """Hydra's several-line composition error as one line naming the key."""
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    key = getattr(cause, "full_key", None)
    if isinstance(cause, ConfigAttributeError) and key:
        return UserError(f"unknown key {key!r}; allowed there: {', '.join(_fields(key))}")
    reason = str(cause).splitlines()[0]
    return UserError(f"{key}: {reason}" if key else reason)


def _plain_sweep(arg: str) -> bool:
    """`rank=1,2`, not `task.paths=[a,b]`, `'x,y'` or `range(1,4)`."""
    return "=" in arg and "," in arg and not re.search(r"[\[\](){}'\"]", arg)


def precheck(args: list[str]) -> None:
    """Compose and validate the command line's config before Hydra starts any job, so a bad
    key or value fails in one line, not with Hydra's page or in the middle of a sweep.

    In a sweep (-m) each value of a plain comma list (`rank=1,2`) is checked with the other
    keys at their first value; other sweep syntax (range(), glob()) and command lines with
    Hydra's other flags (--cfg, --config-name, ...) are left to Hydra.
    """
    multirun = any(a in ("-m", "--multirun") for a in args)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return
    overrides = [a for a in args if not a.startswith(("-", "hydra.", "hydra/", "+hydra"))]
    sweeps = {i: a.split("=", 1) for i, a in enumerate(overrides) if multirun and _plain_sweep(a)}
    first = [f"{sweeps[i][0]}={sweeps[i][1].split(',')[0]}" if i in sweeps else a
             for i, a in enumerate(overrides)]
    jobs = [first] + [first[:i] + [f"{key}={value}"] + first[i + 1:]
                      for i, (key, values) in sweeps.items() for value in values.split(",")[1:]]
    for job in jobs:
        compose_config(job)


def compose_config(overrides: list[str]) -> TrainConfig:
    """One job's validated config, composed from conf/ as Hydra does; `UserError` if bad."""
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise _compose_error(e) from None
    return validate(OmegaConf.to_object(cfg))


OmegaConf.register_new_resolver("job_name", job_name, replace=True)
register()
FAILED: list[str] = []  # jobs of this sweep that stopped with a UserError


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def _run(dict_cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg: TrainConfig = validate(OmegaConf.to_object(dict_cfg))
        from lora_repro.trainer import train  # heavy imports after validation

        summary = train(cfg, run_dir)
    except UserError as e:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        # In a sweep, one bad job must not stop the others (SystemExit would end them all).
        print(f"error: {run_dir.name}: {e}", file=sys.stderr)
        FAILED.append(run_dir.name)
        return None
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
        precheck(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _run()
    if FAILED:
        print(f"error: {len(FAILED)} job(s) of the sweep failed: {', '.join(FAILED)}",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
