"""The run directory's layout and its writing: the contract between training and `analysis/`.

Three modules speak for run directories, each for one side, as their names say: this one
names the files and writes them (and checks a finished job's files against their
checksums); `lora_repro.run_reader` reads one job back (config, tokenizer, models, dW);
`analysis.sweep_runs` finds a sweep's jobs for the analysis commands (complete, failed,
incomplete).

    runs/<name>/<job>/
        run_config.json         the job's full config, written once the directory is checked
        adapter.safetensors     final LoRA factors (`lora_repro.lora.save_adapter`)
        metrics.jsonl           one JSON object per logged step or epoch
        predictions.txt         decoded test outputs, one line per unique source
        predictions-T.txt       side decodes (`evaluate decode --tag T`), with decode-T.json
        base_predictions.txt    only for eval.base=true: the base model's, before training
        tokenizer/              only for model.tokenizer=bpe: the tokenizer trained on the task
        model/                  only for method=full: the fine-tuned model (Hugging Face format)
        summary.json            written last and atomically; a job without it is incomplete;
                                its "artifacts" holds the sha256 of each file it vouches for
        checkpoints/last.pt     resume state (weights, optimizer, scheduler, RNG, data position)
    runs/<name>/.failed/<job>   a failed job's one error line (and `<job>.traceback` for a bug)

Every file a reader may take for finished is written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lora_repro.config import TrainConfig, upgrade_saved
from lora_repro.errors import UserError

SUMMARY = "summary.json"
CONFIG = "run_config.json"
ADAPTER = "adapter.safetensors"
METRICS = "metrics.jsonl"
PREDICTIONS = "predictions.txt"
BASE_PREDICTIONS = "base_predictions.txt"  # eval.base=true: the untrained base's outputs
CHECKPOINT = "checkpoints/last.pt"
LOCK = ".lock"  # held (fcntl.flock) by the process running the job; names its holder
TOKENIZER = "tokenizer"  # only for model.tokenizer=bpe, trained on the task
MODEL = "model"  # method=full: the fine-tuned model as a Hugging Face directory
FAILED = ".failed"  # <sweep dir>/.failed/<job>: the error line of a job that failed
# Keys that do not change what a run computes: a rerun with other values resumes it.
NOT_IDENTITY = ("logger", "eval", "device", "compile", "threads", "name")
LORA_ONLY = ("targets", "rank", "alpha", "dropout")  # no part of a method=full run


def _not_identity(config: dict) -> tuple[str, ...]:
    return NOT_IDENTITY + (LORA_ONLY if config.get("method") == "full" else ())


def temp_name(path: Path) -> Path:
    """A temporary name beside `path`, unique to this writer (pid + random): two processes
    that write the same file never share a temp file, so neither renames the other's away."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def _atomic(path: Path, mode: str):
    """Open a unique temp file; on success fsync it and rename it over `path`."""
    tmp = temp_name(path)
    try:
        with tmp.open(mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash leaves the old or the new
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    with _atomic(path, "w") as f:
        f.write(text)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def identity(cfg: TrainConfig) -> dict:
    """The part of the config that determines a run's result."""
    d = asdict(cfg)
    for key in _not_identity(d):
        d.pop(key, None)
    return d


def flat_identity(config: dict) -> dict[str, Any]:
    """A saved config (summary.json "config") as dotted keys, without NOT_IDENTITY:
    {"model": {"id": "tiny"}, "rank": 8, "logger": ...} -> {"model.id": "tiny", "rank": 8}."""
    def flatten(d: dict, prefix: str) -> dict[str, Any]:
        out = {}
        for key, value in d.items():
            if isinstance(value, dict):
                out |= flatten(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
        return out

    config = upgrade_saved(config)
    return flatten({k: v for k, v in config.items() if k not in _not_identity(config)}, "")


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def check_same_run(run_dir: Path, saved: dict, cfg: TrainConfig) -> None:
    """Refuse to resume or skip a run directory that holds a run of other settings."""
    diff = _diff(upgrade_saved(saved), identity(cfg))
    if diff:
        raise UserError(
            f"{run_dir} holds a run with other settings ({'; '.join(diff[:3])}); "
            "pass name=<new name> or hydra.run.dir=<dir> to start a separate run"
        )


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or corrupt: torch raises one of several types
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to "
                        "start this run over") from None


def artifact_files(run_dir: Path) -> list[str]:
    """The files a summary vouches for, relative to `run_dir`: adapter, predictions, and the
    files of `model/` and `tokenizer/` where the run has them."""
    run_dir = Path(run_dir)
    names = [name for name in (ADAPTER, PREDICTIONS) if (run_dir / name).is_file()]
    for folder in (MODEL, TOKENIZER):
        names += sorted(str(p.relative_to(run_dir)) for p in (run_dir / folder).rglob("*")
                        if p.is_file())
    return names


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checksums(run_dir: Path, names: list[str] | None = None) -> dict[str, str]:
    """{relative path: sha256} of `names` (default: `artifact_files`), for summary.json."""
    names = artifact_files(run_dir) if names is None else names
    return {name: sha256(Path(run_dir) / name) for name in names}


def verify_artifacts(run_dir: Path, summary: dict) -> None:
    """`UserError` naming the first file of a complete job that is missing or differs from
    the sha256 its summary recorded (a summary from before checksums passes unchecked).
    Costs one read of each file (~1 s per GB); adapters are a few MB."""
    run_dir = Path(run_dir)
    for name, digest in summary.get("artifacts", {}).items():
        path = run_dir / name
        what = ("is missing" if not path.is_file()
                else "is damaged (its sha256 differs from summary.json)"
                if sha256(path) != digest else None)
        if what:
            raise UserError(f"{path} {what}; delete the job directory {run_dir} to retrain it")


def failed_markers(sweep_dir: Path) -> list[Path]:
    """The `.failed/<job>` markers of a sweep directory (each holds the job's one line)."""
    return sorted(p for p in (Path(sweep_dir) / FAILED).glob("*")
                  if p.is_file() and not p.name.endswith(".traceback"))


def find_runs(root: Path) -> list[Path]:
    """Every job directory below `root` (a dir holding `run_config.json` or `summary.json`)."""
    return sorted({p.parent for name in (CONFIG, SUMMARY) for p in Path(root).rglob(name)})


_HELD: dict[Path, int] = {}  # run dirs this process holds -> open lock file descriptor


def remove_if_empty(run_dir: Path) -> bool:
    """Remove a failed job's directory where it holds only what was made before the job
    wrote anything: Hydra's `train.log` / `.hydra/` and the lock file of `hold`. A refused job
    leaves nothing behind; a directory another process holds is left alone. True if removed."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and not is_held(run_dir) and all(
            p.name in ("train.log", ".hydra", f"{run_dir.name}.log", LOCK)
            for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
        return True
    return False


def is_held(run_dir: Path) -> bool:
    """Whether a live process holds `run_dir` (see `hold`); this process's own hold counts."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD:
        return True
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here


@contextlib.contextmanager
def hold(run_dir: Path):
    """Hold `run_dir` for this process: an exclusive `fcntl.flock` on `run_dir/.lock`, which
    names the holder (pid, host, start time). Another process that asks for a held directory
    gets a `UserError` naming the holder and changes nothing there. Re-entrant within a
    process (the sweep launcher's worker holds the directory, then `train` asks again).
    The lock dies with its process, so a killed job never leaves a stale lock."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{run_dir} is held by {holder}; wait for that job to end (or stop "
                        "it), then rerun") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _HELD[run_dir] = fd
    try:
        yield
    finally:
        del _HELD[run_dir]
        os.close(fd)  # releases the lock; the file stays (unlinking a lock file races)
