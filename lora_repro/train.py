"""Fine-tune GPT-2 with LoRA: the Hydra entry point.

    python -m lora_repro.train +experiment=smoke                       # offline demo, CPU
    python -m lora_repro.train -m rank=1,2,4,8,64 targets=qv,qkvo      # a sweep, 10 jobs
    python -m lora_repro.train model=gpt2 task=webnlg rank=8 seed=2    # one run

Each job writes `runs/<name>/<job>/` (see `lora_repro.rundir`), with <job> such as
`r8-qv-s1`, plus any other overridden keys. Rerunning the same command resumes an
interrupted job and skips a complete one (after checking its files' checksums).

Failures. The config, the data files and the device are checked before Hydra starts (one
`error:` line, exit 2, nothing written). Inside a job:
- a `UserError` (a mistake the user can fix) or an `OSError` (disk full, a file not
  writable: the machine, not the code) is one line, `error: ...`, and exit status 2;
- any other exception is a bug in the toolkit: a single run shows its traceback (what a bug
  report needs); in a sweep it is the job's one line too, its traceback saved beside the
  job's marker in `<sweep dir>/.failed/<job>.traceback`.
In a sweep (-m) every failed job gets its line `<job>: <ExcClass>: <message>` and a marker
`<sweep dir>/.failed/<job>`, the other jobs go on, and the sweep ends with one line naming
the failed jobs and exit status 2. A refused job leaves no job directory behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, OmegaConfBaseException

from hydra_plugins.lora_repro_launcher.launcher import MPS_CONTROL
from lora_repro import rundir
from lora_repro.config import TrainConfig, register, validate
from lora_repro.errors import UserError
from lora_repro.lora.targets import parse_targets

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "task", "experiment")


def job_name(
    method: str, rank: int, targets: str, seed: int, overrides: str = "", root: str = ""
) -> str:
    """A readable job directory name: `r8-qv-s1`, `full-s1`, plus other overrides such as
    `_lr-0.001` (characters that are unsafe in paths become `-`). Targets are canonical
    (`vq` -> `qv`, one run, one directory). A `model=`/`task=` override is named unless the
    run root `root` (config `name`, by default `<task>-<model id>`) already says it, so
    `+experiment=table3_e2e model=gpt2,gpt2-large` gives two directories."""
    with contextlib.suppress(UserError):  # validation reports it, before any training
        targets = parse_targets(targets)
    said = re.compile(r"(?:model|task)-(.+)")
    overrides = "_".join(item for item in overrides.split("_")
                         if not ((m := said.fullmatch(item)) and m[1] in root))
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
    check_launcher(args)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return
    overrides = [a for a in args if not a.startswith(("-", "hydra.", "hydra/", "+hydra"))]
    checked = set()
    for job in _sweep_jobs(overrides, multirun=any(a in ("-m", "--multirun") for a in args)):
        cfg = compose_config(job)
        key = repr((cfg.task, cfg.device))
        if key not in checked:  # each task's files once, however many jobs share them
            check_job(cfg)
            checked.add(key)


def check_launcher(args: list[str]) -> None:
    """The parallel launcher's options given on the command line: counts of jobs at once,
    and MPS (its control program must be there)."""
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "hydra.launcher.per_gpu" and value.lower() == "auto":
            continue
        if key in ("hydra.launcher.per_gpu", "hydra.launcher.workers",
                   "hydra.launcher.pack") and not (
                value.isdigit() and int(value) >= 1):
            also = (" or auto (the default: from each GPU's memory)"
                    if key.endswith("per_gpu") else "")
            raise UserError(f"{key}={value}: must be an integer >= 1 (jobs at once, or in a "
                            f"pack){also}")
        if key == "hydra.launcher.mps" and value.lower() not in ("auto", "true", "false"):
            raise UserError(f"{arg}: must be auto (the default), true or false")
        if key == "hydra.launcher.mps" and value.lower() == "true" and not shutil.which(
                MPS_CONTROL):
            raise UserError(f"{arg}: {MPS_CONTROL} (part of the NVIDIA driver) is not on "
                            "PATH; use hydra.launcher.mps=auto or false")


def check_job(cfg: TrainConfig) -> None:
    """What a job would refuse only after seconds of imports, checked in well under one:
    the device, and the task's local data files (`lora_repro.data.tasks.check_files`)."""
    import torch  # already imported with the config's LoRA targets

    from lora_repro.data.tasks import check_files, default_options

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device!r}: CUDA is not available here; use device=cpu")
    if cfg.task.name != "corpus":
        options = {k: getattr(cfg.task, k) for k in default_options(cfg.task.name)}
        check_files(cfg.task.name, cfg.task.data_dir, **options)


def _sweep_jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The first job of a sweep (each plain `key=a,b` at its first value), then each other
    value of each such key with the rest at their first values."""
    sweeps = {i: a.split("=", 1) for i, a in enumerate(overrides) if multirun and _plain_sweep(a)}
    first = [f"{sweeps[i][0]}={sweeps[i][1].split(',')[0]}" if i in sweeps else a
             for i, a in enumerate(overrides)]
    return [first] + [first[:i] + [f"{key}={value}"] + first[i + 1:]
                      for i, (key, values) in sweeps.items() for value in values.split(",")[1:]]


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
FAILED = rundir.FAILED  # <sweep dir>/.failed/<job>: the error line of a job that failed


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def _run(dict_cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    marker = Path(hydra_cfg.sweep.dir) / FAILED / run_dir.name
    traceback_path = marker.with_name(marker.name + ".traceback")
    marker.unlink(missing_ok=True)
    traceback_path.unlink(missing_ok=True)
    try:
        cfg: TrainConfig = validate(OmegaConf.to_object(dict_cfg))
        from lora_repro.trainer import train  # heavy imports after validation

        summary = train(cfg, run_dir)
    except Exception as e:
        rundir.remove_if_empty(run_dir)
        if not run_dir.exists():  # (train removes it too)
            _drop_log_handlers(run_dir)
        sweep = hydra_cfg.mode == RunMode.MULTIRUN
        bug = not isinstance(e, UserError | OSError)
        if not sweep:
            if bug:
                raise
            kind = "" if isinstance(e, UserError) else f"{type(e).__name__}: "
            print(f"error: {kind}{_one_line(e)}", file=sys.stderr)
            sys.exit(2)
        # In a sweep, one failed job must not stop the others (SystemExit would end them all).
        # The marker tells `main` of the failure also from a launcher's worker process.
        line = f"{run_dir.name}: {type(e).__name__}: {_one_line(e)}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        if bug:
            traceback_path.write_text(traceback.format_exc())
            line += f" (traceback in {traceback_path})"
        print(f"error: {line}", file=sys.stderr)
        marker.write_text(line + "\n")
        return None
    print(result_line(run_dir, summary))
    return summary["metrics"].get("val_loss")


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines) or repr(e)


def _drop_log_handlers(run_dir: Path) -> None:
    """Close the logging file handlers that write into a removed job directory (Hydra's
    `train.log`): a later log record (a launcher's worker reports the error) would otherwise
    try to reopen it there and crash."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and \
                Path(handler.baseFilename).resolve().parent == Path(run_dir).resolve():
            root.removeHandler(handler)
            handler.close()


def result_line(run_dir: Path, summary: dict) -> str:
    """`runs/smoke/r4-qv-s1: val_loss 0.8110, BLEU 0.6500 (base 0.1200), ... (19 s)`: the
    job's final line; a metric the base model was also scored on (eval.base) shows both."""
    first = ["val_loss", "BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    found, base = summary["metrics"], summary.get("base_metrics") or {}
    keys = [k for k in first if k in found] + sorted(set(found) - set(first) - {"val_ppl"})
    metrics = ", ".join(f"{k} {found[k]:.4f}" + (f" (base {base[k]:.4f})" if k in base else "")
                        for k in keys)
    return f"{run_dir}: {metrics} ({summary['wall_time_s']:.0f} s)"


def main() -> None:
    try:
        check_choices(sys.argv[1:])
        precheck(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    started = time.time()
    _run()
    failed = sweep_failures(sys.argv[1:], started)
    if failed:
        print(f"error: {len(failed)} job(s) of the sweep failed: {'; '.join(failed)}",
              file=sys.stderr)
        sys.exit(2)


def sweep_failures(args: list[str], since: float) -> list[str]:
    """`job: ExcClass: error` of each job of a sweep (-m) that failed after `since`,
    from the markers the jobs leave in the sweep directory (read back here because with a
    launcher such as SLURM the jobs run in other processes, their errors in their logs)."""
    if not any(a in ("-m", "--multirun") for a in args):
        return []
    first = _sweep_jobs([a for a in args if not a.startswith("-")], multirun=True)[0]
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=first, return_hydra_config=True)
        sweep_dir = Path(cfg.hydra.sweep.dir)
    except Exception:  # a sweep syntax compose() does not take: nothing more to report
        return []
    markers = [m for m in rundir.failed_markers(sweep_dir) if m.stat().st_mtime >= since - 1]
    # A job refused because another sweep held it, and then completed by that sweep, is done.
    done = [m for m in markers if (m.parent.parent / m.name / "summary.json").is_file()
            and (m.parent.parent / m.name / "summary.json").stat().st_mtime > m.stat().st_mtime]
    return sorted(m.read_text().strip() for m in markers if m not in done)


if __name__ == "__main__":
    main()
