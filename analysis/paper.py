"""The LoRA paper's published numbers, as data: `analysis/paper/<artifact>.csv`.

Each file holds one artifact of Hu et al. 2021 (arXiv 2106.09685v2) in long form, one row per
number, with its table number and arXiv version in columns and its provenance in `#` header
lines. Setting columns are dotted config keys (`model.id`, `task.name`, `task.train_file`,
`method`, `targets`, `rank`) that must all equal a run's `flat_identity` for the number to
apply; an empty setting cell matches anything. `value` is as the paper prints it, `std` its
"±" (empty where none is printed) and `scale` what turns the official 0..1 metric of a
summary into the printed one (BLEU: 100 in Table 3 and 18; METEOR: 100 in Table 3, 1 in
Table 18). No number is typed into code: a table the paper does not have for a setting is
"no published value".
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lora_repro.errors import UserError

DIR = Path(__file__).with_name("paper")
SETTING = ("model.id", "task.name", "task.train_file", "method", "targets", "rank")
NO_VALUE = "no published value"


@dataclass(frozen=True)
class Published:
    """One number of the paper: value and std as printed, `scale` from the official metric."""

    value: float
    std: float | None
    scale: float
    source: str  # "Table 3 (arXiv 2106.09685v2)"


@functools.cache
def load(artifact: str) -> pd.DataFrame:
    """`analysis/paper/<artifact>.csv` as a DataFrame of strings (setting cells "" = any)."""
    path = DIR / f"{artifact}.csv"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in DIR.glob("*.csv")))
        raise UserError(f"no paper data {path}; known artifacts: {known}")
    return pd.read_csv(path, comment="#", dtype=str, keep_default_na=False)


def description(artifact: str, full: bool = False) -> str:
    """The file's first `#` header line (what the numbers are, for which setting); `full`:
    all of them joined (also how they were read and checked)."""
    lines = [line.lstrip("# ").strip() for line in
             (DIR / f"{artifact}.csv").read_text().splitlines() if line.startswith("#")]
    return " ".join(lines if full else lines[:1])


def _matches(row: Mapping[str, str], identity: Mapping) -> bool:
    """Every non-empty setting cell of `row` equals the run's value of that key."""
    return all(row[key] == "" or str(identity.get(key, "")) == row[key]
               for key in SETTING if key in row)


def lookup(artifact: str, identity: Mapping, metric: str, **where: object) -> Published | None:
    """The paper's number for `metric` in the setting of a run (`flat_identity`), or None.

    `where`: more columns to match exactly (Table 7: layer=48, matrix="q")."""
    table = load(artifact)
    for _, row in table[table["metric"] == metric].iterrows():
        if _matches(row, identity) and all(row[k] == str(v) for k, v in where.items()):
            return Published(float(row["value"]), float(row["std"]) if row["std"] else None,
                             float(row["scale"]),
                             f"Table {row['table']} (arXiv {row['arxiv']})")
    return None


def settings_of(artifact: str) -> str:
    """The settings an artifact's numbers are for, e.g. "gpt3-175b on wikisql, mnli"."""
    table = load(artifact)
    models = ", ".join(dict.fromkeys(table["model.id"]))
    tasks = ", ".join(t for t in dict.fromkeys(table["task.name"]) if t)
    return f"{models} on {tasks}" if tasks else models


def claims() -> pd.DataFrame:
    """The paper's reading of its Figures 3, 4, 6-8 (no numbers are printed for them)."""
    return load("figures").set_index("artifact")
