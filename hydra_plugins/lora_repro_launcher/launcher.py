"""`hydra/launcher=parallel`: run a sweep's jobs side by side, `per_gpu` at once on each GPU.

    python -m lora_repro.train -m rank=1,2,4,8,64 targets=qv,qkvo     # every visible GPU
    python -m lora_repro.train -m ... hydra.launcher.gpus=[0,1] hydra.launcher.per_gpu=8

One job at the paper's setting (GPT-2 Medium, batch 8, ~64 tokens) leaves its GPU idle
while it loads, compiles and validates, and between its small kernels; other jobs on the same
GPU fill those gaps. On an H200, 2 to 10 jobs at once trained 1.2-1.3x the tokens per
second of one alone; processes on one GPU then take turns (bench/RESULTS.md, "Sweep"). So by
default (`mps=auto`) the jobs run under an MPS server of the sweep's own (`mps_server`),
which lets their small kernels run at the same time: 10 jobs at once then trained 26% more
tokens/s, 4 jobs 12% more ("Sweep with and without MPS").

Each job runs in a fresh process (`worker.py`) that sees one GPU (`CUDA_VISIBLE_DEVICES`);
jobs wait in a queue for a free slot, `per_gpu` slots per GPU (`workers` without GPUs);
`per_gpu=auto`, the default, sizes it from the GPUs' memory (`auto_per_gpu`). Each
job's own output (its progress bar, warnings, a traceback) goes to `<job dir>/train.log`; the
terminal gets one line per job as it starts and ends and one progress bar for the sweep.
Without GPUs and with `workers=1` (the default on a CPU machine) the jobs run one after
another in this process, exactly as Hydra's basic launcher.

`pack=K` (opt-in) groups jobs that differ only in rank and targets into packs of up to K
(`packs`, `lora_repro.packed_trainer.pack_key`); a pack is one worker process on one slot,
which trains its jobs as one (`packed_trainer.train_pack`) and reports each job.

Why not hydra-joblib-launcher (the maintained parallel launcher): joblib's loky backend reuses
its worker processes across jobs and gives no way to pin a job to a GPU. A CUDA context
cannot move to another GPU inside a reused process, and a process that trains job after job
also piles up torch.compile recompilations of the same loss function until dynamo's
recompile limit (8) sends later jobs to eager mode. So: one fresh process per job, which also
gives each job its own log file and makes a crash (OOM, a kill) end that job only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)
WORKER = "hydra_plugins.lora_repro_launcher.worker"
LOG = "train.log"  # in the job dir, beside Hydra's own job log (same name: one file)


def visible_gpus() -> list[str]:
    """The GPUs a sweep may use: env LORA_REPRO_GPUS ("0,1"; "" for none), else the entries of
    CUDA_VISIBLE_DEVICES, else every GPU torch counts (NVML; no CUDA context is made)."""
    for var in ("LORA_REPRO_GPUS", "CUDA_VISIBLE_DEVICES"):
        if var in os.environ:
            return [g.strip() for g in os.environ[var].split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


AUTO_GIB_PER_JOB, AUTO_MOST, AUTO_UNKNOWN = 12, 10, 4  # per_gpu=auto, see `auto_per_gpu`


def auto_per_gpu(memory_gib: Sequence[float] | None) -> int:
    """`per_gpu=auto`: jobs at once on each GPU from the GPUs' total memory (GiB each; the
    smallest decides): one per 12 GiB, 1 to 10; 4 when the memory is unknown (None).

    A GPT-2 Medium job at batch 8 peaks at 2.5 GiB, so 12 leaves room for GPT-2 Large and
    longer examples. 10 is the most measured: on an H200 (140 GiB) 10 jobs at once trained
    85k real tokens/s against 71k for 4 (bench/RESULTS.md, "Sweep with and without MPS").
    So an H200 gets 10, an 80 GB GPU 6, a 24 GB one 2."""
    if not memory_gib:
        return AUTO_UNKNOWN
    return max(1, min(AUTO_MOST, int(min(memory_gib) // AUTO_GIB_PER_JOB)))


def gpu_memory_gib(gpus: Sequence[str]) -> list[float] | None:
    """Total memory of `gpus` (CUDA_VISIBLE_DEVICES entries: indices or UUIDs) in GiB, from
    nvidia-smi, which makes no CUDA context; None when it cannot be read (no nvidia-smi, a
    MIG entry it does not take)."""
    exe = shutil.which("nvidia-smi")
    if exe is None or not gpus:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits",
                              "-i", ",".join(gpus)], capture_output=True, text=True, timeout=30)
        mib = [float(line) for line in out.stdout.split()] if out.returncode == 0 else []
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return [m / 1024 for m in mib] if len(mib) == len(gpus) else None


def resolve_per_gpu(setting: Any, gpus: Sequence[Any]) -> tuple[Any, str]:
    """(`per_gpu` as set, "") or, for auto, (`auto_per_gpu`'s count for `gpus`, what it read)."""
    if str(setting).lower() != "auto":
        return setting, ""
    memory = gpu_memory_gib([str(g) for g in gpus]) if gpus else None
    return auto_per_gpu(memory), (f"per_gpu=auto: {min(memory):.0f} GiB" if memory
                                  else "per_gpu=auto: GPU memory unknown")


def slots(gpus: Sequence[Any], per_gpu: int, workers: int) -> list[str | None]:
    """One entry per job that may run at once: each GPU `per_gpu` times (interleaved, so a
    short sweep spreads over all GPUs), or `workers` CPU slots (None)."""
    if not all(isinstance(n, int) and n >= 1 for n in (per_gpu, workers)):
        raise ValueError(f"hydra.launcher.per_gpu={per_gpu}, workers={workers}: must be "
                         "integers >= 1 (per_gpu may also be auto)")
    if not gpus:
        return [None] * workers
    return [str(g) for _ in range(per_gpu) for g in gpus]


def where(slot: str | None) -> str:
    return "CPU" if slot is None else f"GPU {slot}"


MPS_CONTROL = "nvidia-cuda-mps-control"


def use_mps(setting: Any, gpus: Sequence[Any]) -> bool:
    """Whether a sweep on `gpus` runs under an MPS server of its own: `mps=true`, or `auto` (the
    default) when the control program is on PATH and no MPS server is set up already."""
    if not gpus:
        return False
    if str(setting).lower() == "auto":
        return shutil.which(MPS_CONTROL) is not None and "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    return bool(setting)


@contextlib.contextmanager
def mps_server(tmp: Path, required: bool = True):
    """An MPS control daemon of this sweep's own (pipe and log dirs under `tmp`), quit at the
    end. Without MPS, processes on one GPU take turns; with it their kernels may run at the
    same time. The jobs find it through CUDA_MPS_PIPE_DIRECTORY, which they inherit. A daemon
    that fails to start is an error when `required` (mps=true); else one line, and no MPS."""
    exe = shutil.which(MPS_CONTROL)
    if exe is None:  # on the command line, checked before Hydra (`train.check_launcher`)
        _fail(f"{MPS_CONTROL} is not on PATH")
    dirs = {"CUDA_MPS_PIPE_DIRECTORY": tmp / "mps_pipe", "CUDA_MPS_LOG_DIRECTORY": tmp / "mps_log"}
    saved = {var: os.environ.get(var) for var in dirs}
    for path in dirs.values():
        path.mkdir()
    _set_env({var: str(path) for var, path in dirs.items()})
    started = subprocess.run([exe, "-d"]).returncode == 0
    if not started:
        _set_env(saved)  # the jobs must not look for a daemon that is not there
        if required:
            _fail(f"`{exe} -d` failed")
        print(f"{MPS_CONTROL} -d failed: the jobs share the GPU without MPS "
              "(hydra.launcher.mps=false hides this line)", file=sys.stderr)
    try:
        yield
    finally:
        if started:
            subprocess.run([exe], input="quit\n", text=True, check=False)
            _set_env(saved)


def _fail(reason: str) -> None:
    """mps=true cannot be had: one line and exit 2, as the CLI's other errors (raising here
    would get Hydra's traceback)."""
    print(f"error: hydra.launcher.mps=true: {reason}; use hydra.launcher.mps=auto or false",
          file=sys.stderr)
    sys.exit(2)


def _set_env(values: dict[str, str | None]) -> None:
    """Set (or, for None, unset) environment variables of this process and its children."""
    for var, value in values.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


def packs(keys: Sequence[str | None], size: int) -> list[list[int]]:
    """The jobs (indices into `keys`) grouped into packs of at most `size` jobs with equal
    keys, in sweep order; a job with key None is a pack of its own."""
    groups: dict[str, list[int]] = {}
    units: list[list[int]] = []
    for i, key in enumerate(keys):
        if key is None or size <= 1:
            units.append([i])
            continue
        group = groups.get(key)
        if group is None or len(group) == size:
            group = groups[key] = []
            units.append(group)
        group.append(i)
    return units


class ParallelLauncher(Launcher):
    def __init__(self, gpus: Any = None, per_gpu: Any = "auto", workers: int = 1,
                 mps: Any = "auto", pack: int = 1) -> None:
        self.gpus, self.per_gpu, self.workers, self.mps = gpus, per_gpu, workers, mps
        self.pack = pack
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        gpus = self.gpus
        if gpus is None:
            gpus = visible_gpus()
        elif isinstance(gpus, (int, str)):  # gpus=1 or gpus="0,1" rather than a list
            gpus = [g for g in str(gpus).split(",") if g.strip()]
        per_gpu, why = resolve_per_gpu(self.per_gpu, gpus)
        free = slots(gpus, per_gpu, self.workers)
        if free == [None] and self.pack <= 1:  # CPU, one at a time, in this process:
            # as Hydra's basic launcher
            from hydra._internal.core_plugins.basic_launcher import BasicLauncher

            basic = BasicLauncher()
            basic.setup(hydra_context=self.hydra_context, task_function=self.task_function,
                        config=self.config)
            return basic.launch(job_overrides, initial_job_idx)
        setup_globals()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="lora_repro_sweep_") as tmp:
            jobs = [self._prepare(initial_job_idx + i, list(o), Path(tmp))
                    for i, o in enumerate(job_overrides)]
            units = _packs(jobs, self.pack) if self.pack > 1 else None
            mps = use_mps(self.mps, gpus)
            required = str(self.mps).lower() != "auto"
            with mps_server(Path(tmp), required) if mps else contextlib.nullcontext():
                return _Sweep(jobs, free, units, why).run()

    def _prepare(self, idx: int, overrides: list[str], tmp: Path) -> dict:
        """The job's config, directory and a pickled payload for its worker process."""
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = idx
            config.hydra.job.num = idx
        saved = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config)  # ${hydra:...} in the sweep dir resolves
        job_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))) / str(
            OmegaConf.select(config, "hydra.sweep.subdir"))
        HydraConfig.instance().cfg = saved
        task = self.task_function
        module = task.__module__  # `python -m pkg.app` runs it as __main__: import pkg.app
        if module == "__main__" and getattr(sys.modules["__main__"], "__spec__", None):
            module = sys.modules["__main__"].__spec__.name
        payload = tmp / f"job{idx}.pkl"
        payload.write_bytes(pickle.dumps({
            "hydra_context": self.hydra_context, "config": config,
            # resolvers are functions: the worker gets them by importing the task's module
            "singletons": Singleton.get_state()["instances"], "task": (module, task.__name__),
            "job_dir": str(job_dir),
        }))
        log.info(f"#{idx} : {' '.join(filter_overrides(overrides))}")
        return {"idx": idx, "overrides": overrides, "config": config, "dir": job_dir,
                "payload": payload}


def _packs(jobs: list[dict], size: int) -> list[list[int]]:
    """`packs` of prepared jobs by `packed_trainer.pack_key`; a complete job (it will only
    say so) and one whose config it refuses (with its own line) run alone. One line names
    the unfinished jobs that cannot pack."""
    from lora_repro.config import validate
    from lora_repro.packed_trainer import PACKS_NEED, pack_key

    keys, alone = [], []
    for job in jobs:
        key = None
        if not (job["dir"] / "summary.json").is_file():
            config = job["config"].copy()
            with open_dict(config):
                del config["hydra"]
            with contextlib.suppress(Exception):  # the job refuses it itself, in one line
                key = pack_key(validate(OmegaConf.to_object(config)))
            if key is None:
                alone.append(job["dir"].name)
        keys.append(key)
    if alone:
        print(f"sweep: {len(alone)} job(s) train alone, not packed ({alone[0]}, ...): a pack "
              f"needs {PACKS_NEED}")
    return packs(keys, size)


class _Sweep:
    """Runs prepared jobs in worker processes, one per free slot, and reports each. A unit
    of several jobs (a pack) is one process."""

    def __init__(self, jobs: list[dict], free: list[str | None],
                 units: list[list[int]] | None = None, why: str = ""):
        from tqdm.auto import tqdm

        self.jobs, self.n_slots, self.why = jobs, len(free), why
        self.units = units or [[i] for i in range(len(jobs))]
        self.free: queue.Queue = queue.Queue()
        for slot in free:
            self.free.put(slot)
        self.lock = threading.Lock()
        self.failed = 0  # counted under self.lock
        self.bar = tqdm(total=len(jobs), desc="sweep", unit="job", file=sys.stderr,
                        dynamic_ncols=True, disable=None)  # no bar when not a terminal

    def say(self, line: str, error: bool = False) -> None:
        with self.lock:
            self.failed += error
            self.bar.write(line, file=sys.stderr if error else sys.stdout)

    def run(self) -> list[JobReturn]:
        t0 = time.time()
        gpus = sorted({s for s in list(self.free.queue) if s is not None})
        why = f"; {self.why}" if self.why else ""
        self.say(f"sweep: {len(self.jobs)} jobs, {self.n_slots} at a time"
                 + (f" ({self.n_slots // len(gpus)} per GPU on GPUs {','.join(gpus)}{why})"
                    if gpus else " on CPU"))
        with ThreadPoolExecutor(max_workers=self.n_slots) as pool:
            futures = [pool.submit(self.run_unit, [self.jobs[i] for i in unit])
                       for unit in self.units]
            try:
                done = {i: r for unit, f in zip(self.units, futures, strict=True)
                        for i, r in zip(unit, f.result(), strict=True)}
                returns = [done[i] for i in range(len(self.jobs))]
            except KeyboardInterrupt:  # the running jobs got the Ctrl-C too; start no more
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        self.bar.close()
        self.say(f"sweep: {len(self.jobs)} jobs in {time.time() - t0:.0f} s, "
                 f"{self.failed} failed")
        return returns

    def run_unit(self, unit: list[dict]) -> list[JobReturn]:
        """One job, or a pack of jobs, in one worker process on a free slot."""
        slot = self.free.get()  # a pool thread always finds one: as many threads as slots
        try:
            values = self.execute(unit, slot)
        finally:
            self.free.put(slot)
            with self.lock:
                self.bar.update(len(unit))
        return [JobReturn(overrides=job["overrides"], cfg=job["config"], hydra_cfg=job["config"],
                          working_dir=os.getcwd(), task_name=str(job["config"].hydra.job.name),
                          status=JobStatus.COMPLETED, _return_value=value)
                for job, value in zip(unit, values, strict=True)]

    def env(self, slot: str | None) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
            # The cores are shared: a GPU job's CPU work (data collation; compiling kernels,
            # in inductor's worker pool) gets its share, so threads x jobs <= cores.
            share = str(max(1, (os.cpu_count() or 1) // self.n_slots))
            env.setdefault("OMP_NUM_THREADS", share)
            env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", share)
        return env

    def execute(self, unit: list[dict], slot: str | None) -> list[Any]:
        """Run the worker of one job (or pack); print each job's end line; return the task's
        return values."""
        started = time.time()
        pack = f" (pack of {len(unit)})" if len(unit) > 1 else ""
        for job in unit:
            self.say(f"{job['dir']}: started on {where(slot)}{pack}")
        payloads = [str(job["payload"]) for job in unit]
        with unit[0]["payload"].with_suffix(".log").open("w") as early:  # before train.log
            proc = subprocess.Popen([sys.executable, "-m", WORKER, *payloads],
                                    env=self.env(slot), stdout=early, stderr=subprocess.STDOUT)
            rc = proc.wait()
        return [self.report(job, slot, proc.pid, rc, started, unit[0]) for job in unit]

    def report(self, job: dict, slot: str | None, pid: int, rc: int, started: float,
               first: dict) -> Any:
        """One job's end line, from what its worker process left; its return value."""
        from lora_repro.train import FAILED, result_line

        job_dir, payload = job["dir"], job["payload"]
        marker = job_dir.parent / FAILED / job_dir.name
        out = payload.with_suffix(".out")
        summary_path = job_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        ran = summary.get("pid") == pid and (summary.get("ended_at") or 0) >= started
        if not ran and marker.is_file() and marker.stat().st_mtime >= started - 1:
            self.say(f"error: {marker.read_text().strip()}", error=True)
            return None
        if rc != 0 or not out.is_file():  # the process died (a kill, out of memory, a crash)
            line = f"{job_dir.name}: its process exited with code {rc}: " + _last_line(
                first["dir"] / LOG, first["payload"].with_suffix(".log"), since=started)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(line + "\n")
            self.say(f"error: {line}", error=True)
            return None
        if ran:
            rate = summary.get("train_tokens_per_s") or 0
            self.say(f"{result_line(job_dir, summary)} [{where(slot)}, {rate:,.0f} tokens/s, "
                     f"warm-up {summary.get('warmup_s') or 0:.0f} s]")
        else:
            self.say(f"{job_dir}: complete (summary.json), skipped")
        return json.loads(out.read_text())["value"]


def _last_line(*logs: Path, since: float) -> str:
    """The last non-empty line of the first log written since `since` (a traceback's last)."""
    for path in logs:
        if path.is_file() and path.stat().st_mtime >= since - 1:
            lines = [x.strip() for x in path.read_text(errors="replace").splitlines()]
            lines = [x for x in lines if x]
            if lines:
                return lines[-1][-300:].split("\r")[-1]
    return "no output"
