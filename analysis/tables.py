"""The LoRA paper's result tables from run summaries (Hu et al. 2021, Tables 3, 5-6, 13, 14
and 18).

A run summary is a dict as `summary.json` holds it (see `lora_repro.rundir`)::

    {"config": {"model": "gpt2-medium" | {"id": ...}, "task": "e2e" | {"name": ...},
                "method": "lora" | "full" (default "lora"), "targets": "qv", "rank": 4,
                "seed": 1},
     "metrics": {"BLEU": 0.704, "NIST": 8.85, "METEOR": 0.468, "ROUGE_L": 0.718,
                 "CIDEr": 2.53, "val_loss": 1.18},
     "trainable_params": 350208}

Metrics are on the official E2E scale (BLEU, METEOR, ROUGE-L in 0..1); each table scales
them as the paper prints them. Runs that differ only in `seed` form one configuration:
tables show the mean and the sample standard deviation (ddof 1) over seeds, "70.4±.1" as
in Table 3; a metric a run lacks counts as missing, not as zero. Where runs of one model,
task, method, targets and rank differ in another key too (a sweep over `lr`), that key
becomes a "Setting" ("lr=0.0001") that keeps them apart. Pure functions returning
pandas DataFrames, and `write_table` for Markdown, LaTeX and CSV.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from lora_repro.errors import UserError
from lora_repro.lora.targets import ALLOWED, parse_targets
from lora_repro.rundir import flat_identity, write_atomic

CONFIG = ("model", "task", "method", "targets", "rank", "setting")  # one row of a table
# The identity keys that CONFIG's columns (and seed) already stand for.
CONFIG_KEYS = ("model.id", "task.name", "method", "targets", "rank", "seed")
FRACTIONS = ("BLEU", "METEOR", "ROUGE_L", "BLEU_S", "BLEU_U", "METEOR_S", "METEOR_U")  # 0..1
# metric -> (scale, decimals) as each table prints it.
TABLE3_FORMAT = {"BLEU": (100, 1), "NIST": (1, 2), "METEOR": (100, 1), "ROUGE_L": (100, 1),
                 "CIDEr": (1, 2)}
TABLE18_FORMAT = {"val_loss": (1, 2), "BLEU": (100, 2), "NIST": (1, 4), "METEOR": (1, 4),
                  "ROUGE_L": (1, 4), "CIDEr": (1, 4)}
HEADERS = {"BLEU": "BLEU", "NIST": "NIST", "METEOR": "MET", "ROUGE_L": "ROUGE-L",
           "CIDEr": "CIDEr", "val_loss": "Val Loss"}
# Tables 13 (WebNLG) and 14 (DART): GenerationEval's metrics as the paper prints them; Table 13
# per part: seen (S, key suffix "_S"), unseen (U, "_U") and all (A, no suffix) categories.
WEBNLG_DART_FORMAT = {"BLEU": (100, 1), "METEOR": (1, 2), "TER": (1, 2)}
PARTS = {"S": "_S", "U": "_U", "A": ""}
HEADERS |= {"TER": "TER"} | {f"{m}{suffix}": f"{HEADERS.get(m, m)} {part}"
                             for m in WEBNLG_DART_FORMAT for part, suffix in PARTS.items()
                             if suffix}
MODEL_LABELS = {"gpt2": "GPT-2 S", "gpt2-medium": "GPT-2 M", "gpt2-large": "GPT-2 L",
                "gpt2-xl": "GPT-2 XL"}
METHOD_LABELS = {"lora": "LoRA", "full": "FT"}


# ---------------------------------------------------------------- runs


def _name(value, key: str) -> str:
    """A model or task as a string: the string itself, or a config dict's "id" / "name"."""
    if isinstance(value, Mapping):
        value = value.get(key, value.get("name"))
    if not isinstance(value, str) or not value:
        raise KeyError(key)
    return value


def _run_row(summary: Mapping, where: str) -> dict:
    """One summary as a flat row: CONFIG keys but "setting", seed, trainable_params,
    metrics (raw)."""
    try:
        config, metrics = summary["config"], dict(summary["metrics"])
        method = config.get("method", "lora")
        row = {
            "model": _name(config["model"], "id"),
            "task": _name(config["task"], "name"),
            "method": method,
            "targets": parse_targets(config["targets"]) if method == "lora" else "all",
            "rank": int(config["rank"]) if method == "lora" else pd.NA,
            "seed": int(config["seed"]),
            "trainable_params": int(summary["trainable_params"]),
        }
    except (KeyError, TypeError) as missing:
        raise UserError(f"{where}: summary lacks {missing}; expected config.model, config.task, "
                        "config.targets, config.rank, config.seed, metrics, trainable_params"
                        ) from None
    for name in FRACTIONS:
        if metrics.get(name) is not None and metrics[name] > 1:
            raise UserError(f"{where}: {name}={metrics[name]} is above 1; summaries hold the "
                            "official 0..1 scale, not percentages")
    return row | metrics


def runs_frame(summaries: Sequence[Mapping]) -> pd.DataFrame:
    """One row per run: model, task, method, targets, rank, seed, trainable_params, metrics.

    Metrics stay on the official scale. Raises `UserError` for a summary missing a key, a
    fraction metric above 1, or two runs of one configuration with the same seed. A summary
    may carry "run_dir" to name itself in errors.
    """
    if not summaries:
        raise UserError("no run summaries: give at least one run directory with summary.json")
    rows = [_run_row(s, str(s.get("run_dir", f"summary #{n}"))) for n, s in enumerate(summaries)]
    runs = pd.DataFrame(rows)
    runs["rank"] = runs["rank"].astype("Int64")
    runs["setting"] = settings(runs, [flat_identity(s["config"]) for s in summaries])
    twice = runs.duplicated([*CONFIG, "seed"], keep=False)
    if twice.any():
        first = runs[twice].iloc[0]
        raise UserError("two runs share a configuration and seed ("
                        + ", ".join(f"{k}={first[k]}" for k in (*CONFIG, "seed"))
                        + "); keep one, or give them different seeds")
    return runs


def settings(runs: pd.DataFrame, identities: Sequence[Mapping]) -> list[str]:
    """Per run, "key=value, ..." of the config keys outside CONFIG that vary within some
    configuration (so its runs are not seeds of one setting); "" for every run if none do.

    runs: `_run_row` rows; identities: each run's `flat_identity`, in the same order."""
    def value(identity: Mapping, key: str) -> str:
        return str(identity.get(key, "–"))

    keys: dict[str, None] = {}
    base = runs[[c for c in CONFIG if c != "setting"]].astype(str)
    for _, group in base.groupby(list(base.columns), sort=False):
        members = [identities[i] for i in group.index]
        for key in dict.fromkeys(k for identity in members for k in identity):
            if key not in CONFIG_KEYS and len({value(m, key) for m in members}) > 1:
                keys[key] = None
    return [", ".join(f"{k}={value(identity, k)}" for k in keys) for identity in identities]


def aggregate(runs: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Mean, sample std (ddof 1) and count over seeds, per configuration.

    runs: `runs_frame`. Returns one row per CONFIG (sorted, full fine-tuning first within a
    model and task) and columns (metric, "mean" | "std" | "n") for each metric, plus
    ("trainable_params", "mean"); metrics stay on the official scale.
    """
    for name in metrics:
        if name not in runs.columns:
            runs = runs.assign(**{name: math.nan})
    runs = runs.astype({name: "float64" for name in metrics})
    grouped = runs.groupby(list(CONFIG), dropna=False, sort=False)
    table = grouped[list(metrics)].agg(["mean", "std", "count"]).rename(columns={"count": "n"})
    table[("trainable_params", "mean")] = grouped["trainable_params"].mean()
    order = table.index.to_frame(index=False).assign(
        full=lambda f: f["method"] != "full", size=lambda f: f["targets"].str.len())
    order = order.sort_values(["model", "task", "full", "size", "targets", "rank", "setting"])
    return table.iloc[order.index]


# ---------------------------------------------------------------- formatting


def mean_std(mean: float, std: float, decimals: int, n: int | None = None,
             n_most: int | None = None) -> str:
    """"70.4±.1" as the paper prints it: the std without its leading zero; the mean alone
    when std is missing (one seed); "–" when the mean is missing. A cell averaged over `n`
    seeds where its siblings have up to `n_most` says so: "70.4 (n=1)"."""
    if pd.isna(mean):
        return "–"
    text = f"{mean:.{decimals}f}"
    if not pd.isna(std):
        spread = f"{std:.{decimals}f}"
        text += f"±{spread[1:] if spread.startswith('0.') else spread}"
    if n is not None and n_most is not None and n < n_most:
        text += f" (n={n})"
    return text


def params_label(n: float) -> str:
    """Trainable parameters as Table 3 prints them: "0.35M", "354.92M"; below 0.1M, "98.3K"."""
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def targets_label(targets: str) -> str:
    """"qv" -> "Wq, Wv" (Tables 5-6); "all" for full fine-tuning."""
    return "all" if targets == "all" else ", ".join(f"W{t}" for t in targets)


def _row_index(levels: Mapping[str, Sequence]) -> pd.Index:
    """A table's row index from named levels; a "Setting" level only where one is set."""
    levels = {k: list(v) for k, v in levels.items() if k != "Setting" or any(v)}
    if len(levels) == 1:
        (name, values), = levels.items()
        return pd.Index(values, name=name)
    return pd.MultiIndex.from_arrays(list(levels.values()), names=list(levels))


def _formatted(table: pd.DataFrame, fmt: Mapping[str, tuple[float, int]]) -> pd.DataFrame:
    """Columns HEADERS[metric] of mean±std strings, scaled and rounded as `fmt` says; a cell
    over fewer seeds than the most in its column ends in "(n=<seeds>)"."""
    def column(m: str, scale: float, d: int) -> list[str]:
        counts = table[(m, "n")]
        return [mean_std(mu * scale, sd * scale, d, int(n), int(counts.max()))
                for mu, sd, n in zip(table[(m, "mean")], table[(m, "std")], counts, strict=True)]

    return pd.DataFrame({HEADERS[m]: column(m, scale, d) for m, (scale, d) in fmt.items()},
                        index=table.index)


# ---------------------------------------------------------------- tables


def table3(summaries: Sequence[Mapping],
           fmt: Mapping[str, tuple[float, int]] | None = None) -> pd.DataFrame:
    """Table 3: one row per configuration, "# Trainable Parameters" and mean±std over seeds of
    BLEU, NIST, MET, ROUGE-L, CIDEr (BLEU, MET, ROUGE-L x100). Index: "Model & Method"
    ("GPT-2 M (LoRA)"), "Task", "Weight Type" ("Wq, Wv"), "r" ("–" for full fine-tuning).
    fmt: metric -> (scale, decimals), default `TABLE3_FORMAT`."""
    fmt = TABLE3_FORMAT if fmt is None else fmt
    table = aggregate(runs_frame(summaries), list(fmt))
    out = _formatted(table, fmt)
    out.insert(0, "# Trainable Parameters",
               [params_label(n) for n in table[("trainable_params", "mean")]])
    keys = table.index.to_frame(index=False)
    out.index = _row_index({
        "Model & Method": [f"{MODEL_LABELS.get(m, m)} ({METHOD_LABELS.get(k, k)})"
                           for m, k in zip(keys["model"], keys["method"], strict=True)],
        "Task": keys["task"],
        "Weight Type": [targets_label(t) for t in keys["targets"]],
        "r": ["–" if pd.isna(r) else str(r) for r in keys["rank"]],
        "Setting": keys["setting"],
    })
    return out


def table13(summaries: Sequence[Mapping]) -> pd.DataFrame:
    """Table 13 (WebNLG): as `table3`, with columns "BLEU S", "BLEU U", "BLEU A", "MET S", ...,
    "TER A": BLEU (x100), MET and TER of the seen (S), unseen (U) and all (A) test
    categories, mean±std over seeds."""
    fmt = {f"{m}{suffix}": spec for m, spec in WEBNLG_DART_FORMAT.items()
           for suffix in PARTS.values()}
    out = table3(summaries, fmt)
    out.columns = [out.columns[0]] + [f"{HEADERS[m]} {part}" for m in WEBNLG_DART_FORMAT
                                      for part in PARTS]
    return out


def table14(summaries: Sequence[Mapping]) -> pd.DataFrame:
    """Table 14 (DART): as `table3` with BLEU (x100), MET and TER, mean±std over seeds."""
    return table3(summaries, WEBNLG_DART_FORMAT)


def _only(runs: pd.DataFrame, keys: Sequence[str], what: str) -> None:
    """UserError unless every run shares one value of each key (one model, task, ...)."""
    for key in keys:
        values = sorted(runs[key].astype(str).unique())
        if len(values) > 1:
            raise UserError(f"{what} needs one {key}, the runs have {values}; select runs first")


def table18(summaries: Sequence[Mapping],
            fmt: Mapping[str, tuple[float, int]] | None = None) -> pd.DataFrame:
    """Table 18: validation loss and test metrics against the rank r (Appendix H.2).

    All summaries must share model, task and targets (LoRA runs only). Rows: "Rank r"
    ascending (and "Setting" where runs of one rank differ in more than seed); cells
    mean±std over seeds, printed as the paper does (BLEU x100 with 2 decimals, NIST,
    METEOR, ROUGE-L, CIDEr raw with 4, val loss with 2: `TABLE18_FORMAT`).
    """
    fmt = TABLE18_FORMAT if fmt is None else fmt
    runs = runs_frame(summaries)
    if (runs["method"] != "lora").any():
        raise UserError("table18 plots LoRA runs against rank; drop the full fine-tuning runs")
    _only(runs, ("model", "task", "targets"), "table18")
    table = aggregate(runs, list(fmt))
    out = _formatted(table, fmt).rename(columns={"MET": "METEOR"})
    out.index = _row_index({"Rank r": table.index.get_level_values("rank"),
                            "Setting": table.index.get_level_values("setting")})
    return out.sort_index()


def targets_rank_grid(summaries: Sequence[Mapping], metric: str = "BLEU",
                      scale: float | None = None) -> pd.DataFrame:
    """Tables 5-6: the mean of `metric` over seeds, rows "Weight Type" ("Wq", "Wq, Wv", ...,
    fewer targets first, then "Setting" where runs differ in more than seed), columns r
    ascending; NaN where no run exists (Table 5's
    same-budget layout has one rank per row). All runs must share model and task.

    scale defaults to Table 3's (x100 for BLEU, METEOR, ROUGE-L). Numbers, not strings.
    """
    runs = runs_frame(summaries)
    runs = runs[runs["method"] == "lora"]
    if runs.empty:
        raise UserError("targets_rank_grid needs LoRA runs; the summaries hold none")
    _only(runs, ("model", "task"), "targets_rank_grid")
    if scale is None:
        scale = TABLE3_FORMAT.get(metric, (1, 2))[0]
    table = aggregate(runs, [metric])[(metric, "mean")] * scale
    grid = table.droplevel(["model", "task", "method"]).unstack("rank")
    grid = grid.reindex(sorted(grid.index, key=lambda k: (
        len(k[0]), [ALLOWED.index(c) for c in k[0]], k[1])))
    grid = grid.reindex(columns=sorted(grid.columns))
    grid.index = _row_index({"Weight Type": [targets_label(t) for t, _ in grid.index],
                             "Setting": [setting for _, setting in grid.index]})
    grid.columns = pd.Index([int(r) for r in grid.columns], name="r")
    return grid


def fewer_seeds(summaries: Sequence[Mapping]) -> list[str]:
    """The configurations averaged over fewer seeds than the most of them, as
    "targets r<rank> [setting] (n=<seeds>)": what a grid of plain means cannot show."""
    runs = runs_frame(summaries)
    counts = runs.groupby(list(CONFIG), dropna=False, sort=False).size()
    return [" ".join(filter(None, [key[3], f"r{key[4]}", key[5]])) + f" (n={n})"
            for key, n in counts.items() if n < counts.max()]


# ---------------------------------------------------------------- writers


def write_table(table: pd.DataFrame, path: str | Path, decimals: int = 1) -> Path:
    """Write a table as Markdown (.md), LaTeX (.tex) or CSV (.csv), chosen by suffix.

    Floats (e.g. `targets_rank_grid`) print with `decimals` in Markdown and LaTeX; CSV keeps
    full precision. The file is written to a temporary name and renamed.
    """
    path = Path(path)
    float_format = f"{{:.{decimals}f}}".format
    if path.suffix == ".md":  # index levels become ordinary, named columns
        flat = table.reset_index() if any(table.index.names) else table
        text = flat.to_markdown(index=flat is table, floatfmt=f".{decimals}f") + "\n"
    elif path.suffix == ".tex":
        text = table.to_latex(float_format=float_format, na_rep="–")
    elif path.suffix == ".csv":
        text = table.to_csv()
    else:
        raise UserError(f"table file {path}: allowed suffixes .md, .tex, .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return path


# ---------------------------------------------------------------- command

COMMAND = "analysis.tables"
COMMAND_DOC = """Result tables of a sweep's complete runs (Hu et al. 2021, Tables 3, 5-6, 18).

    python -m analysis.tables [SWEEP] [--metric BLEU|val_loss|...]
        [--out figures/<sweep>/tables] [--wandb offline]

Writes Table 3 (all runs; a "Val Loss" column beside the paper's metrics), Tables 13 and 14
(WebNLG and DART runs scored with task.metrics=generation_eval), Table 18 (LoRA
runs, one per model, task and targets) and the targets x rank grid of --metric (one per model
and task) as table3, table18, grid_<metric> (plus what else varies) .md, .tex and .csv in
--out, and prints the Markdown. Seeds of one configuration are averaged (mean±std).
"""
TABLE3_COMMAND_FORMAT = {**TABLE3_FORMAT, "val_loss": (1, 2)}


def choose_metric(summaries: Sequence[Mapping], wanted: str | None) -> str:
    """--metric, else BLEU where a run has it, else val_loss; `UserError` if no run has it."""
    found = {k for s in summaries for k, v in s["metrics"].items() if v is not None}
    metric = wanted or ("BLEU" if "BLEU" in found else "val_loss")
    if metric not in found:
        raise UserError(f"--metric={metric}: no run has it; the runs have "
                        f"{', '.join(sorted(found)) or 'no metrics'}")
    return metric


def _grouped(runs, keys: Sequence[str]) -> dict[str, list]:
    """Runs by the values of `keys`, labelled by those that vary ("" when one group)."""
    from analysis.sweep_runs import label, varying_keys

    varying = [k for k in varying_keys(runs) if k in keys]
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(label(run, varying), []).append(run)
    return groups


def command_tables(runs, metric: str) -> dict[str, pd.DataFrame]:
    """File stem -> table: Table 3 of all runs; Table 18 and the targets x rank grid of the
    LoRA runs, one per model, task (and targets, for Table 18)."""
    summaries = [run.summary | {"run_dir": str(run.path)} for run in runs]
    out = {"table3": table3(summaries, TABLE3_COMMAND_FORMAT)}
    for task, make in (("webnlg", table13), ("dart", table14)):  # where runs scored TER
        scored = [s for s in summaries if _name(s["config"]["task"], "name") == task
                  and "TER" in s["metrics"]]
        if scored:
            out[make.__name__] = make(scored)
    lora = [run for run in runs if run.method == "lora"]
    for context, group in _grouped(lora, ("model.id", "task.name", "targets")).items():
        name = "_".join(filter(None, ["table18", context]))
        out[name] = table18([run.summary for run in group])
    for context, group in _grouped(lora, ("model.id", "task.name")).items():
        name = "_".join(filter(None, ["grid", metric, context]))
        out[name] = targets_rank_grid([run.summary for run in group], metric)
        few = fewer_seeds([run.summary for run in group])
        if few:
            from analysis.sweep_runs import warn

            warn(f"{name}: cells averaged over fewer seeds than the others: {', '.join(few)}")
    return out


def run_command(args) -> int:
    """The command: write and print every table; returns the exit status."""
    from analysis import cli
    from analysis.sweep_runs import load_runs

    sweep, runs = load_runs(args.sweep)
    metric = choose_metric([run.summary for run in runs], args.metric)
    decimals = TABLE3_FORMAT.get(metric, (1, 2))[1]
    files, out = [], cli.out_dir(args, sweep, "tables")
    for stem, table in command_tables(runs, metric).items():
        digits = decimals if stem.startswith("grid_") else 1
        files += [write_table(table, out / f"{stem}{suffix}", digits)
                  for suffix in (".md", ".tex", ".csv")]
        print(f"{stem}:\n{(out / f'{stem}.md').read_text()}")
    return cli.finish(args, COMMAND, sweep, files, runs)


def build_parser():
    from analysis import cli

    parser = cli.base_parser(COMMAND, COMMAND_DOC)
    parser.add_argument("--metric", help="the grid's metric, e.g. BLEU or val_loss "
                        "(default: BLEU if a run has it, else val_loss)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m analysis.tables`: 0 on success, 2 with one `error:` line otherwise."""
    from analysis import cli

    return cli.run_main(run_command, build_parser(), argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
