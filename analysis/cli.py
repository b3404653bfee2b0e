"""What the analysis commands share: arguments, layer and matrix choices, W&B, exit codes.

Every command reads `[SWEEP]` (default: the newest sweep under `runs/`), writes figures and
tables into `--out` (default `figures/<sweep>/<section>/`, so two sweeps never mix their
files), records what it wrote in `<out>/.<command>.json` (read by `analysis.report` to reuse
results newer than the runs), and logs them to W&B under the sweep directory when
`--wandb` (or the environment's WANDB_MODE) names a mode other than "disabled". A mistake a
user can fix prints ``error: <message>`` on stderr and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tqdm import tqdm

from lora_repro.errors import UserError
from lora_repro.lora.targets import ALLOWED

WANDB_MODES = ("online", "offline", "disabled")
PROJECT = "lora-repro"


def base_parser(prog: str, doc: str, sweeps: str = "?") -> argparse.ArgumentParser:
    """A parser with the arguments every analysis command takes: SWEEP, --out, --wandb.
    sweeps: SWEEP's nargs ("*" for commands that take several)."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs=sweeps, type=Path,
                        help="sweep directory holding job dirs (default: the newest under runs/)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where figures and tables go (default: figures/<sweep>/<section>/)")
    parser.add_argument("--wandb", choices=WANDB_MODES, default=None,
                        help="log figures and tables to W&B (default: $WANDB_MODE, else disabled)")
    return parser


def add_layer_arguments(parser: argparse.ArgumentParser, matrices: str) -> None:
    """--layers (1-based) and --matrices (letters of q k v o f p)."""
    parser.add_argument("--layers", default=None,
                        help="1-based layers, e.g. 1,8,16,24 (default: first, 1/3, 2/3, last)")
    parser.add_argument("--matrices", default=None,
                        help=f"matrix letters, e.g. q,v (default: {matrices})")


def run_main(body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None) -> int:
    """Parse `argv`, run `body(args)`; a `UserError` prints one line and returns 2."""
    args = parser.parse_args(argv)
    try:
        return body(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- layers and matrices


def default_layers(n_layer: int) -> list[int]:
    """First, 1/3, 2/3 and last layer, 0-based (GPT-2 M: 1, 8, 16, 24 1-based; the paper's
    1, 32, 64, 96 of 96 layers)."""
    one_based = {1, max(1, n_layer // 3), max(1, 2 * n_layer // 3), n_layer}
    return sorted(layer - 1 for layer in one_based)


def parse_layers(text: str | None, n_layer: int) -> list[int]:
    """`--layers` ("1,8,16,24", 1-based) as sorted 0-based indices; default `default_layers`."""
    if text is None:
        return default_layers(n_layer)
    try:
        layers = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise UserError(f"--layers={text!r}: expected 1-based layer numbers such as 1,8,16,24"
                        ) from None
    bad = [layer for layer in layers if not 1 <= layer <= n_layer]
    if bad:
        raise UserError(f"--layers: layer {bad[0]} is out of range; the model has layers "
                        f"1..{n_layer}")
    return [layer - 1 for layer in layers]


def parse_matrices(text: str | None, available: str, default: str | None = None) -> str:
    """`--matrices` ("q,v" or "qv") as letters in canonical order, each one the runs adapted.

    `available`: the letters every run has. Unset: `default` where the runs have it, else
    all of `available`.
    """
    if text is None:
        letters = default if default and set(default) <= set(available) else available
    else:
        letters = text.replace(",", "").strip()
    unknown = sorted(set(letters) - set(ALLOWED))
    if unknown or not letters or len(set(letters)) != len(letters):
        raise UserError(f"--matrices={text!r}: give distinct letters of {ALLOWED!r} "
                        "(q k v o attention, f p MLP), e.g. q,v")
    missing = sorted(set(letters) - set(available))
    if missing:
        raise UserError(f"--matrices: the runs did not adapt {''.join(missing)!r}; they share "
                        f"{available!r}")
    return "".join(m for m in ALLOWED if m in letters)


def parse_pair(text: str | None, what: str) -> tuple[int, int] | None:
    """`--ranks 8,64` / `--seeds 1,2`: two distinct integers, ascending; None when unset."""
    if text is None:
        return None
    try:
        a, b = sorted(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--{what}={text!r}: expected two integers, e.g. --{what} 8,64") from None
    if a == b:
        raise UserError(f"--{what}={text!r}: give two different values")
    return a, b


def matrix_title(letter: str) -> str:
    """"q" -> "ΔWq", as panel titles name a LoRA update."""
    return f"ΔW{letter}"


def progress(items: Iterable, desc: str, total: int | None = None) -> Iterable:
    """A tqdm bar on stderr that vanishes when done; none where stderr is not a terminal."""
    return tqdm(items, desc=desc, total=total, leave=False, file=sys.stderr, mininterval=0.5,
                disable=None)


# ---------------------------------------------------------------- W&B


def wandb_mode(arg: str | None) -> str:
    """--wandb, else $WANDB_MODE if it names a mode, else "disabled"."""
    if arg is not None:
        return arg
    env = os.environ.get("WANDB_MODE")
    return env if env in WANDB_MODES else "disabled"


def log_to_wandb(mode: str, command: str, sweep: Path, files: Sequence[Path],
                 config: dict) -> None:
    """One W&B run (job_type "analysis", files under the sweep dir) with every PNG as an
    image and every CSV as a table, keyed by file stem. Does nothing when disabled."""
    if mode == "disabled":
        return
    import pandas as pd
    import wandb

    run = wandb.init(project=PROJECT, job_type="analysis", mode=mode, dir=str(sweep),
                     group=sweep.name, name=f"{command}-{sweep.name}", config=config,
                     settings=wandb.Settings(silent=True, console="off"))
    try:
        logged = {}
        for path in files:
            if path.suffix == ".png":
                logged[path.stem] = wandb.Image(str(path))
            elif path.suffix == ".csv":
                logged[path.stem] = wandb.Table(dataframe=pd.read_csv(path))
        run.log(logged)
    finally:
        run.finish()


# ---------------------------------------------------------------- output


FIGURES = Path("figures")


def out_dir(args: argparse.Namespace, sweep: Path, section: str) -> Path:
    """`--out`, else figures/<sweep name>/<section> (section: "subspace", "tables", ...);
    stored back into `args.out`."""
    if args.out is None:
        args.out = FIGURES / Path(sweep).name / section
    return args.out


def manifest_path(out: Path, command: str) -> Path:
    """Where a command records what it wrote: <out>/.<command>.json."""
    return Path(out) / f".{command}.json"


def run_stamps(runs: Iterable) -> dict[str, int]:
    """Job dir -> mtime (ns) of its summary.json (a peft adapter directory: of its
    adapter_config.json): a manifest is stale when these change."""
    def stamp(path: Path) -> int:
        summary = path / "summary.json"
        return (summary if summary.is_file() else path / "adapter_config.json").stat().st_mtime_ns

    return {str(run.path.resolve()): stamp(run.path) for run in runs}


def write_manifest(out: Path, command: str, runs: Iterable, files: Sequence[Path],
                   options: dict) -> Path:
    """Record the runs (and their summaries' mtimes), options and files of one command."""
    from lora_repro.rundir import write_json

    path = manifest_path(out, command)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"command": command, "runs": run_stamps(runs), "options": options,
                      "files": sorted({str(Path(f).relative_to(out)) for f in files})})
    return path


def finish(args: argparse.Namespace, command: str, sweep: Path, files: Sequence[Path],
           runs: Iterable = ()) -> int:
    """Record the files in the manifest, log them to W&B, print where they went; status 0."""
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    options = {k: v for k, v in config.items() if k not in ("sweep", "out", "wandb")}
    write_manifest(args.out, command, runs, files, options)
    log_to_wandb(wandb_mode(args.wandb), command, sweep, files, config)
    print(f"wrote {len(files)} files to {args.out}/", file=sys.stderr)
    return 0
