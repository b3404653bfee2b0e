"""`python -m hydra_plugins.lora_repro_launcher.worker JOB.pkl [JOB.pkl ...]`: one job of a
parallel sweep, or a pack of jobs trained as one (`hydra.launcher.pack`).

Takes the job directory's lock first (`lora_repro.rundir.hold`): a job another process holds
fails with one line and nothing in its directory changes. Then sends this process's output
to `<job dir>/train.log` and runs the job as Hydra's basic launcher would (`run_job`), from
the config the launcher composed. A failure leaves its one line in `<sweep>/.failed/<job>`;
the return value goes to `JOB.out`.

A pack: each job's config and directory are set up by `run_job` as above, then
`lora_repro.packed_trainer.train_pack` trains them together; the output goes to the first
job's train.log (the others' say where). A failure of the pack is each of its jobs' line.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
import traceback
from pathlib import Path


def _load(payload_path: str) -> dict:
    """A job's payload, with Hydra's global state (resolvers, singletons) set up for it."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import setup_globals
    from omegaconf.basecontainer import BaseContainer

    payload = pickle.loads(Path(payload_path).read_bytes())
    module, name = payload["task"]
    importlib.import_module(module)  # registers the task module's resolvers
    setup_globals()  # Hydra's resolvers
    Singleton.set_state({"instances": payload["singletons"],
                         "omegaconf_resolvers": BaseContainer._resolvers})
    return payload


def _log_to(path: Path) -> None:
    """Send this process's stdout and stderr to `path` (appended)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def main(payload_path: str) -> None:
    from hydra.core.utils import JobStatus, run_job

    from lora_repro import rundir
    from lora_repro.errors import UserError

    payload = _load(payload_path)
    module, name = payload["task"]
    task = getattr(importlib.import_module(module), name)  # hydra.main's wrapper passes cfg on
    job_dir = Path(payload["job_dir"])
    error, value = None, None
    try:
        with rundir.hold(job_dir):
            _log_to(job_dir / "train.log")
            ret = run_job(hydra_context=payload["hydra_context"], task_function=task,
                          config=payload["config"], job_dir_key="hydra.sweep.dir",
                          job_subdir_key="hydra.sweep.subdir")
            if ret.status == JobStatus.FAILED:  # an exception the task let out
                exc = ret._return_value
                traceback.print_exception(type(exc), exc, exc.__traceback__)
                error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            else:
                value = ret.return_value
    except UserError as e:  # the job directory is held by another process
        error = str(e)
    if error is not None:
        _mark_failed(job_dir, error)
    _write_out(payload_path, value)


def _mark_failed(job_dir: Path, error: str) -> None:
    """The job's error line, on stderr and in its marker `<sweep>/.failed/<job>`."""
    from lora_repro.train import FAILED

    print(f"error: {job_dir.name}: {error}", file=sys.stderr)
    marker = job_dir.parent / FAILED / job_dir.name
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{job_dir.name}: {error}\n")


def _write_out(payload_path: str, value) -> None:
    try:
        json.dumps(value)
    except TypeError:
        value = None
    Path(payload_path).with_suffix(".out").write_text(json.dumps({"value": value}))


def main_pack(payload_paths: list[str]) -> None:
    """Several jobs, trained as one pack (`train_pack`); each gets its `.out` or marker."""
    import contextlib

    from hydra.core.utils import JobStatus, run_job
    from omegaconf import OmegaConf

    from lora_repro import rundir
    from lora_repro.config import validate
    from lora_repro.errors import UserError
    from lora_repro.train import FAILED, _one_line

    payloads = [_load(path) for path in payload_paths]
    dirs = [Path(p["job_dir"]) for p in payloads]
    cfgs = []

    def setup(cfg) -> None:  # run by run_job in the job's Hydra context: its checked config
        cfgs.append(validate(OmegaConf.to_object(cfg)))

    error, summaries = None, []
    try:
        with contextlib.ExitStack() as held:
            for job_dir in dirs:
                held.enter_context(rundir.hold(job_dir))
                # as `train._run` does: an old failure is not this run's
                (job_dir.parent / FAILED / job_dir.name).unlink(missing_ok=True)
            _log_to(dirs[0] / "train.log")
            for job_dir in dirs[1:]:
                with (job_dir / "train.log").open("a") as f:
                    f.write(f"trained in a pack of {len(dirs)}: its log is {dirs[0]}/train.log\n")
            for payload in payloads:
                ret = run_job(hydra_context=payload["hydra_context"], task_function=setup,
                              config=payload["config"], job_dir_key="hydra.sweep.dir",
                              job_subdir_key="hydra.sweep.subdir")
                if ret.status == JobStatus.FAILED:
                    raise ret._return_value
            from lora_repro.packed_trainer import train_pack

            summaries = train_pack(cfgs, dirs)
    except Exception as e:
        import traceback

        error = f"{type(e).__name__}: {_one_line(e)}"
        if not isinstance(e, UserError | OSError):
            traceback.print_exc()
    for i, (path, job_dir) in enumerate(zip(payload_paths, dirs, strict=True)):
        if error is not None:
            _mark_failed(job_dir, error)
        else:
            print(f"{job_dir}: val_loss {summaries[i]['metrics']['val_loss']:.4f}")
            _write_out(path, summaries[i]["metrics"].get("val_loss"))


if __name__ == "__main__":
    if len(sys.argv) > 2:
        main_pack(sys.argv[1:])
    else:
        main(sys.argv[1])
