"""`python -m hydra_plugins.lora_repro_launcher.worker JOB.pkl`: one job of a parallel sweep.

Takes the job directory's lock first (`lora_repro.rundir.hold`): a job another process holds
fails with one line and nothing in its directory changes. Then sends this process's output
to `<job dir>/train.log` and runs the job as Hydra's basic launcher would (`run_job`), from
the config the launcher composed. A failure leaves its one line in `<sweep>/.failed/<job>`;
the return value goes to `JOB.out`.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
import traceback
from pathlib import Path


def main(payload_path: str) -> None:
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus, run_job, setup_globals
    from omegaconf.basecontainer import BaseContainer

    from lora_repro import rundir
    from lora_repro.errors import UserError
    from lora_repro.train import FAILED

    payload = pickle.loads(Path(payload_path).read_bytes())
    module, name = payload["task"]
    task = getattr(importlib.import_module(module), name)  # hydra.main's wrapper passes cfg on
    setup_globals()  # Hydra's resolvers; the task's module registered its own on import
    Singleton.set_state({"instances": payload["singletons"],
                         "omegaconf_resolvers": BaseContainer._resolvers})
    job_dir = Path(payload["job_dir"])
    marker = job_dir.parent / FAILED / job_dir.name
    error, value = None, None
    try:
        with rundir.hold(job_dir):
            fd = os.open(job_dir / "train.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(fd, 1)
            os.dup2(fd, 2)
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
        print(f"error: {job_dir.name}: {error}", file=sys.stderr)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{job_dir.name}: {error}\n")
    try:
        json.dumps(value)
    except TypeError:
        value = None
    Path(payload_path).with_suffix(".out").write_text(json.dumps({"value": value}))


if __name__ == "__main__":
    main(sys.argv[1])
