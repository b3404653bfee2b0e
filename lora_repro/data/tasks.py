"""`load_task`: one entry point for E2E, WebNLG 2017, DART and the synthetic task.

Options map 1:1 to the keys of a Hydra ``task:`` config group (``conf/task/<name>.yaml``)::

    name: e2e                 # e2e | webnlg | dart | synthetic
    data_dir: null            # folder with the official files; null = the Hugging Face hub
    train_file: trainset.csv  # file names inside data_dir (defaults: the official names)
    valid_file: devset.csv    # null = no validation file (see valid_fraction)
    test_file: testset_w_refs.csv   # null = no test split
    valid_fraction: 0.0       # > 0: carve validation from the train file BY SOURCE
    max_train_examples: null  # seeded random subsets (kept in file order) for quick runs
    max_valid_examples: null
    max_test_sources: null
    references: paper         # e2e only: paper (tokenized as the LoRA code's files) | original

`OFFLINE_E2E` is the preset used here, where no E2E train set exists: train on devset.csv
split by MR into train/valid, test on testset_w_refs.csv. With ``data_dir: null`` the file
options pick hub splits by their official names (``devset.csv`` -> the hub's validation).

The synthetic task takes ``n_train, n_valid, n_test, refs_per_source`` (and the ``max_*``).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from pathlib import Path

from lora_repro.data import dart, e2e, hub, references, synthetic, webnlg
from lora_repro.data.records import Example, TaskData, group_by_source
from lora_repro.errors import UserError

READERS: dict[str, tuple[Callable[[Path], list[Example]], dict[str, str]]] = {
    "e2e": (e2e.read_e2e_csv, e2e.OFFICIAL_FILES),
    "webnlg": (webnlg.read_webnlg_json, webnlg.OFFICIAL_FILES),
    "dart": (dart.read_dart_json, dart.OFFICIAL_FILES),
}
TASKS = tuple(sorted([*READERS, "synthetic"]))
SPLITS = ("train", "valid", "test")
SUBSET_OPTIONS = {"max_train_examples": None, "max_valid_examples": None, "max_test_sources": None}
SYNTHETIC_OPTIONS = {"n_train": 500, "n_valid": 50, "n_test": 50, "refs_per_source": 3}
OFFLINE_E2E = {
    "train_file": "devset.csv", "valid_file": None, "test_file": "testset_w_refs.csv",
    "valid_fraction": 0.1,
}


def default_options(name: str) -> dict:
    """Every option `name` accepts, with its default."""
    if name == "synthetic":
        return {**SYNTHETIC_OPTIONS, **SUBSET_OPTIONS}
    files = {f"{split}_file": READERS[name][1][split] for split in SPLITS}
    refs = {"references": "paper"} if name in references.TOKENIZED_TASKS else {}
    return {**files, "valid_fraction": 0.0, **SUBSET_OPTIONS, **refs}


def _check_int(key: str, value, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if optional else "")
        raise UserError(f"task.{key}={value!r}: must be {allowed}")


def check_options(name: str, options: dict) -> dict:
    """Validate `options` for task `name`; returns them merged over the defaults."""
    defaults = default_options(name)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise UserError(f"unknown option task.{unknown[0]} for task {name}; "
                        f"allowed: {', '.join(defaults)}")
    opts = {**defaults, **options}
    for key in SUBSET_OPTIONS:
        _check_int(key, opts[key], 1, optional=True)
    if name == "synthetic":
        for key, minimum in (("n_train", 1), ("n_valid", 0), ("n_test", 0), ("refs_per_source", 1)):
            _check_int(key, opts[key], minimum)
        return opts
    if "references" in opts:
        references.check_references(opts["references"], name)
    frac = opts["valid_fraction"]
    if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 <= frac < 1:
        raise UserError(f"task.valid_fraction={frac!r}: must be a number in [0, 1)")
    for split in SPLITS:
        value = opts[f"{split}_file"]
        if (value is None and split == "train") or not isinstance(value, str | None) or value == "":
            raise UserError(f"task.{split}_file={value!r}: must be a file name"
                            + ("" if split == "train" else " or null"))
    if frac > 0 and opts["valid_file"] is not None:
        raise UserError(f"task.valid_fraction={frac} carves validation from the train file: "
                        f"set task.valid_file=null (now {opts['valid_file']!r})")
    return opts


def split_by_source(
    examples: list[Example], fraction: float, seed: int,
) -> tuple[list[Example], list[Example]]:
    """Split examples into (train, valid) by source: all references of a source go together.

    ``round(fraction * n_sources)`` sources (at least 1, at most n - 1) chosen by a
    `random.Random(seed)` go to valid; both parts keep the input order.
    """
    sources = list(dict.fromkeys(ex.source for ex in examples))
    if fraction <= 0 or len(sources) < 2:
        return list(examples), []
    n_valid = min(max(1, round(fraction * len(sources))), len(sources) - 1)
    valid = set(random.Random(seed).sample(sources, n_valid))
    return ([ex for ex in examples if ex.source not in valid],
            [ex for ex in examples if ex.source in valid])


def subset(items: list, n: int | None, seed: int) -> list:
    """A seeded random subset of `n` items, kept in their original order (all if n is None)."""
    if n is None or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def _read_file(name: str, data_dir: Path, key: str, file_name: str,
               prepare: Callable[[str], str] | None = None) -> list[Example]:
    """Read one split file with the task's reader (E2E: text through `prepare`); every
    failure is a one-line UserError."""
    reader, official = READERS[name]
    path = data_dir / file_name
    if not path.is_file():
        raise UserError(f"task.{key}: {path} not found (official {name} files: "
                        f"{', '.join(official.values())}; set task.{key} to another name)")
    try:
        examples = reader(path) if prepare is None else reader(path, prepare)
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise UserError(f"task.{key}: cannot parse {path} ({type(err).__name__}: {err})") from err
    if not examples:  # a header-only file: a run on it would train or score nothing
        raise UserError(f"task.{key}: {path} holds no examples; give a file with at least one")
    return examples


def check_files(name: str, data_dir: str | None, **options) -> None:
    """The cheap part of `load_task`'s checks, for a command line before any job starts
    (well under a second even for E2E's 42k-row train file): options, that each local file
    exists, is UTF-8, and, for E2E, has the `mr,ref` header and a row below it. The readers
    check the rest when the job loads the data. Hub data (data_dir null) is not touched."""
    if name not in TASKS:
        raise UserError(f"task.name={name!r} is unknown; allowed: {', '.join(TASKS)}")
    opts = check_options(name, options)
    if name == "synthetic" or data_dir is None:
        return
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"task.data_dir={data_dir!r}: no such directory (it should hold "
                        f"{', '.join(READERS[name][1].values())})")
    for split in SPLITS:
        key = f"{split}_file"
        if opts[key] is None:
            continue
        path = root / opts[key]
        if not path.is_file():
            raise UserError(f"task.{key}: {path} not found (official {name} files: "
                            f"{', '.join(READERS[name][1].values())}; set task.{key} to "
                            "another name)")
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise UserError(f"task.{key}: {path} is not UTF-8 ({err.reason} at byte "
                            f"{err.start})") from None
        except OSError as err:
            raise UserError(f"task.{key}: cannot read {path} ({err.strerror})") from None
        if name == "e2e":
            try:
                e2e.check_header(path, text)
            except UserError as err:
                raise UserError(f"task.{key}: {err}") from None
        elif not text.strip():
            raise UserError(f"task.{key}: {path} is empty")


def _hub_split(name: str, key: str, file_name: str, refs: str) -> list[Example]:
    """The hub split that corresponds to an official file name."""
    by_file = {f: split for split, f in READERS[name][1].items()}
    if file_name not in by_file:
        raise UserError(f"task.{key}={file_name!r} has no hub equivalent (official names: "
                        f"{', '.join(by_file)}); set task.data_dir to read local files")
    return hub.load_hub_split(name, by_file[file_name], refs)


def _read_splits(name: str, data_dir: str | None, opts: dict) -> dict[str, list[Example]]:
    """Examples of each split whose file option is set, from `data_dir` or the hub."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"task.data_dir={data_dir!r}: no such directory (it should hold "
                            f"{', '.join(READERS[name][1].values())})")
    out = {}
    refs = opts.get("references", "paper")
    for split in SPLITS:
        key = f"{split}_file"
        if opts[key] is None:
            out[split] = []
        elif data_dir is None:
            out[split] = _hub_split(name, key, opts[key], refs)
        else:
            prepare = references.text_transform(refs, split) if "references" in opts else None
            out[split] = _read_file(name, root, key, opts[key], prepare)
    return out


def load_task(name: str, *, data_dir: str | None = None, seed: int = 0, **options) -> TaskData:
    """Load a task's train/valid/test splits (see the module docstring for `options`).

    Args:
        name: one of `TASKS`.
        data_dir: folder with the official files; None reads the Hugging Face hub
            (the synthetic task generates its data and takes no data_dir).
        seed: seeds the by-source validation split, the ``max_*`` subsets and the
            synthetic generator.

    Returns:
        `TaskData` whose test split groups all references of a source, in order of first
        appearance in the test file.

    Raises:
        UserError: unknown task or option, bad option value, missing directory or file,
            malformed file, or an unreachable hub.
    """
    if name not in TASKS:
        raise UserError(f"task.name={name!r} is unknown; allowed: {', '.join(TASKS)}")
    opts = check_options(name, options)
    if name == "synthetic":
        if data_dir is not None:
            raise UserError(f"task.data_dir={data_dir!r}: the synthetic task generates its "
                            "data; set task.data_dir=null")
        data = synthetic.synthetic_task(**{k: opts[k] for k in SYNTHETIC_OPTIONS}, seed=seed)
        train, valid, test = data.train, data.valid, data.test
    else:
        splits = _read_splits(name, data_dir, opts)
        train, valid = splits["train"], splits["valid"]
        if opts["valid_fraction"] > 0:
            train, valid = split_by_source(train, opts["valid_fraction"], seed)
        # WebNLG's seen / unseen test parts: categories of the (whole) train split.
        seen = {ex.category for ex in splits["train"]} if name == "webnlg" else None
        test = group_by_source(splits["test"], seen)
    return TaskData(
        name=name,
        train=subset(train, opts["max_train_examples"], seed),
        valid=subset(valid, opts["max_valid_examples"], seed),
        test=subset(test, opts["max_test_sources"], seed),
    )
