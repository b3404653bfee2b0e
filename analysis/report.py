"""One self-contained report of a sweep beside the paper's numbers (Hu et al. 2021).

    python -m analysis.report [SWEEP ...] [--out figures/<sweep>] [--screenshot report.png]
        [--wandb offline]

Per sweep, runs what is missing of `analysis.tables`, `analysis.subspace` and
`analysis.amplification` into `<out>/tables`, `<out>/subspace`, `<out>/amplification` (a
command's results are reused when its manifest lists the same runs, unchanged, and its
default options), then writes `<out>/report.html` (figures embedded as PNG, no external
resources, print CSS for PDF), `<out>/report.md` and the comparison tables as LaTeX
(`<out>/compare_*.tex`). With several sweeps the report goes to `--out` (default
`figures/report`), each sweep's files to `<out>/<sweep>/`. Tables show ours (mean±std over
seeds, n) beside the paper's value and the difference, or "no published value" where the
paper has none for the setting (`analysis/paper/*.csv`). Provenance (jobs complete / failed
/ missing, model, base fingerprint, data, commit, device, versions, compute time, W&B group)
heads each sweep. With W&B on, the report is logged to the sweep's W&B group as an artifact.
`--screenshot` renders the report's first screen with headless Chromium.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from analysis import amplification, browser, cli, paper, provenance, subspace, tables
from analysis.sweep_runs import Run, load_runs, lowest_seed_per_config
from lora_repro.errors import UserError
from lora_repro.rundir import read_json, write_atomic

COMMAND = "analysis.report"
ARXIV = "2106.09685v2"
SECTIONS = {"tables": tables, "subspace": subspace, "amplification": amplification}


@dataclass
class Part:
    """One block of a sweep's report: a title, notes, claims, HTML tables and figures."""

    id: str
    title: str
    note: str = ""
    claims: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)  # HTML
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)  # stem -> table (md, tex)
    figures: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------- running the commands


def ensure(section: str, sweep: Path, runs: Sequence[Run], out: Path) -> tuple[list[Path], str]:
    """Run one analysis command into `out`, or reuse its results there when its manifest
    lists the same runs, unchanged, and its default options. Returns the files and a note
    ("reused", "computed", or why the command had nothing to do)."""
    module = SECTIONS[section]
    default = vars(module.build_parser().parse_args([str(sweep)]))
    options = {k: v for k, v in default.items() if k not in ("sweep", "out", "wandb")}
    manifest = cli.manifest_path(out, module.COMMAND)
    if manifest.is_file():
        saved = read_json(manifest)
        files = [out / f for f in saved["files"]]
        if (saved["runs"] == cli.run_stamps(runs) and saved["options"] == options
                and all(f.is_file() for f in files)):
            return files, "reused"
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = module.main([str(sweep), "--out", str(out), "--wandb", "disabled"])
    if status != 0:
        reason = next((line[7:] for line in err.getvalue().splitlines()
                       if line.startswith("error: ")), "failed")
        return [], f"not computed: {reason}"
    return [out / f for f in read_json(manifest)["files"]], "computed"


# ---------------------------------------------------------------- ours beside the paper


def _labels(row: pd.Series) -> dict[str, str]:
    """A configuration's columns as Table 3 names them."""
    model = tables.MODEL_LABELS.get(row["model"], row["model"])
    method = tables.METHOD_LABELS.get(row["method"], row["method"])
    labels = {"Model & Method": f"{model} ({method})", "Task": row["task"],
              "Weight Type": tables.targets_label(row["targets"]),
              "r": "–" if pd.isna(row["rank"]) else str(row["rank"])}
    return labels | ({"Setting": row["setting"]} if row["setting"] else {})


def compare(runs: Sequence[Run], artifact: str, fmt: dict[str, tuple[float, int]]
            ) -> pd.DataFrame:
    """Ours beside the paper: one row per configuration and metric of `fmt`.

    Columns: the configuration (`_labels`), Metric, Ours (mean±std over seeds, printed as
    `fmt` says), n, Paper (as printed, or "no published value"), Δ (ours − paper, on the
    paper's scale), Source."""
    frame = tables.runs_frame([run.summary | {"run_dir": str(run.path)} for run in runs])
    keys = frame[list(tables.CONFIG)].astype(str).agg("|".join, axis=1)
    identity = {k: runs[i].identity for i, k in reversed(list(enumerate(keys)))}
    table = tables.aggregate(frame, list(fmt))
    rows = []
    for config, values in table.iterrows():
        row = pd.Series(dict(zip(tables.CONFIG, config, strict=True)))
        ident = identity["|".join(str(v) for v in config)]
        for metric, (scale, decimals) in fmt.items():
            mean, std, n = (values[(metric, k)] for k in ("mean", "std", "n"))
            found = paper.lookup(artifact, ident, metric)
            ours = tables.mean_std(mean * scale, std * scale, decimals)
            cells = {"Metric": tables.HEADERS.get(metric, metric), "Ours": ours, "n": int(n)}
            if found is None:
                cells |= {"Paper": paper.NO_VALUE, "Δ": "", "Source": ""}
            else:
                printed = tables.mean_std(found.value, found.std if found.std else float("nan"),
                                          decimals)
                delta = "" if pd.isna(mean) else f"{mean * found.scale - found.value:+.{decimals}f}"
                cells |= {"Paper": printed, "Δ": delta, "Source": found.source}
            rows.append(_labels(row) | cells)
    return pd.DataFrame(rows)


def paper_grid(runs: Sequence[Run], grid: pd.DataFrame, metric: str) -> pd.DataFrame | None:
    """The paper's values in the cells of a targets x rank grid (Table 6, else Table 18), or
    None when no cell has one."""
    cells = pd.DataFrame("–", index=grid.index, columns=grid.columns)
    found = False
    for run in runs:
        for artifact in ("table6", "table18"):
            value = paper.lookup(artifact, run.identity, metric)
            if value is not None and run.rank in cells.columns:
                label = tables.targets_label(run.targets)
                rows = [i for i in cells.index if (i[0] if isinstance(i, tuple) else i) == label]
                for index in rows:
                    cells.loc[index, run.rank] = f"{value.value:g} ({value.source.split(' (')[0]})"
                found = True
                break
    return cells if found else None


# ---------------------------------------------------------------- the parts of a report


def _html(table: pd.DataFrame, table_id: str, index: bool = False, decimals: int = 3) -> str:
    """A table as HTML (id `table_id`), "no published value" cells greyed."""
    html = table.to_html(index=index, na_rep="–", table_id=table_id, border=0,
                         float_format=lambda v: f"{v:.{decimals}f}")
    return html.replace(f"<td>{paper.NO_VALUE}</td>", f'<td class="none">{paper.NO_VALUE}</td>')


def table_parts(runs: Sequence[Run], files: list[Path]) -> list[Part]:
    """Table 3 and Table 18 beside the paper, and the targets x rank grid (Tables 5-6)."""
    fmt3 = {**tables.TABLE3_FORMAT, "val_loss": (1, 2)}
    t3 = compare(runs, "table3", fmt3)
    parts = [Part("table3", "Table 3: E2E metrics against the paper",
                  note=paper.description("table3"), tables=[_html(t3, "compare-table3")],
                  frames={"compare_table3": t3})]
    lora = [run for run in runs if run.method == "lora"]
    for n, (context, group) in enumerate(
            tables._grouped(lora, ("model.id", "task.name", "targets")).items()):
        if len({run.rank for run in group}) < 2:
            continue
        t18 = compare(group, "table18", tables.TABLE18_FORMAT)
        stem = "_".join(filter(None, ["compare_table18", context]))
        parts.append(Part(f"table18-{n}", f"Table 18: metrics against rank {context}".strip(),
                          note=paper.description("table18"),
                          tables=[_html(t18, f"compare-table18-{n}")], frames={stem: t18}))
    for path in sorted(f for f in files if f.name.startswith("grid_") and f.suffix == ".csv"):
        grid = pd.read_csv(path)  # index: "Weight Type" (and "Setting"), columns: ranks
        grid = grid.set_index([c for c in grid.columns if not c.isdigit()])
        grid.columns = pd.Index([int(c) for c in grid.columns], name="r")
        metric = path.stem.split("_")[1]
        if metric == "val":
            metric = "val_loss"
        theirs = paper_grid(lora, grid, metric)
        decimals = tables.TABLE3_FORMAT.get(metric, (1, 2))[1]
        note = (f"No published value: the paper's targets x rank grid (Table 6) is "
                f"{paper.settings_of('table6')}." if theirs is None else
                "Paper values where the setting matches (Table 6, else Table 18).")
        part = Part(f"grid-{path.stem}", f"Targets x rank: {path.stem} (Tables 5-6)", note=note,
                    tables=[_html(grid, path.stem, index=True, decimals=decimals)],
                    frames={path.stem: grid})
        if theirs is not None:
            part.tables.append(_html(theirs, f"{path.stem}-paper", index=True))
        parts.append(part)
    return parts


def _png(files: list[Path], test) -> list[Path]:
    return sorted(f for f in files if f.suffix == ".png" and test(f.stem))


def _claims(runs: Sequence[Run], figures: Sequence[str]) -> list[str]:
    claims = paper.claims()
    models = sorted({run.identity.get("model.id") for run in runs})
    out = []
    for name in figures:
        row = claims.loc[name]
        value = ("" if row["model.id"] in models else
                 f" — {paper.NO_VALUE} for {', '.join(map(str, models))}")
        out.append(f"Paper, {name} ({row['model.id']}, arXiv {row['arxiv']}): "
                   f"{row['claim']}{value}")
    return out


def subspace_parts(runs, files: list[Path], note: str) -> list[Part]:
    """Figures 3-4 (per layer) and 6-7 (layers side by side) with the phi summaries."""
    part = Part("subspace", "Subspace similarity: Figures 3, 4, 6, 7", note=note,
                claims=_claims(runs, ["Figure 3", "Figure 4", "Figure 6", "Figure 7"]))
    for stem in ("phi_top", "phi_seed_block"):
        path = next((f for f in files if f.name == f"{stem}.csv"), None)
        if path is not None:
            frame = pd.read_csv(path)
            part.tables.append(_html(frame, stem))
            part.frames[stem] = frame
    part.figures = (_png(files, lambda s: "_layers_" not in s)  # Figures 3-4, per layer
                    + _png(files, lambda s: "_layers_" in s))  # Figures 6-7
    return [part]


def amplification_parts(runs, files: list[Path], note: str) -> list[Part]:
    """Table 7 (with the paper's where the setting matches), the amplification factor
    against rank, Figure 8."""
    part = Part("amplification", "W against ΔW: Table 7, amplification factor, Figure 8",
                note=note, claims=_claims(runs, ["Figure 8"]))
    sources = lowest_seed_per_config(runs)
    matched = [s for s in sources if paper.lookup("table7", s.identity, "dW", layer=48)]
    if not matched:
        part.claims.insert(0, f"Table 7: {paper.NO_VALUE} — the paper's Table 7 is "
                              f"{paper.settings_of('table7')}, layer 48 of 96, W_q.")
    for path in sorted(f for f in files if f.name.startswith("table7_") and f.suffix == ".csv"):
        frame = pd.read_csv(path)
        part.tables.append(_html(frame, path.stem))
        part.frames[path.stem] = frame
    if matched:
        theirs = paper.load("table7")
        part.tables.append(_html(theirs[["rank", "layer", "matrix", "metric", "value"]],
                                 "table7-paper"))
    part.figures = (_png(files, lambda s: s.startswith("amplification_"))
                    + _png(files, lambda s: s.startswith("weight_similarity_")))
    return [part]


# ---------------------------------------------------------------- building


@dataclass
class SweepReport:
    name: str
    prov: provenance.Provenance
    parts: list[Part]
    compute: str


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def build_sweep(sweep: Path | None, out: Path) -> SweepReport:
    """Provenance and parts of one sweep; runs the analysis commands into `out` as needed."""
    sweep, runs = load_runs(sweep)
    prov = provenance.read(sweep, runs)
    results = {section: ensure(section, sweep, runs, out / section) for section in SECTIONS}
    parts = table_parts(runs, results["tables"][0])
    parts += subspace_parts(runs, *_with_note(results["subspace"], "subspace"))
    parts += amplification_parts(runs, *_with_note(results["amplification"], "amplification"))
    return SweepReport(sweep.name, prov, parts, _duration(prov.compute_s))


def _with_note(result: tuple[list[Path], str], section: str) -> tuple[list[Path], str]:
    """(files, "analysis.<section>: reused" / "computed" / "not computed: <why>")."""
    files, status = result
    return files, f"analysis.{section}: {status}"


def render_html(reports: Sequence[SweepReport], seconds: float) -> str:
    """The self-contained HTML: every figure inline as base64 PNG."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("analysis", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))
    sweeps = [{"name": r.name, "prov": r.prov, "compute": r.compute,
               "parts": [{"id": p.id, "title": p.title, "note": p.note, "claims": p.claims,
                          "tables": p.tables,
                          "figures": [{"name": f.name, "data": base64.b64encode(
                              f.read_bytes()).decode()} for f in p.figures]}
                         for p in r.parts]} for r in reports]
    built = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return env.get_template("report.html.j2").render(
        sweeps=sweeps, arxiv=ARXIV, built=built, seconds=f"{seconds:.1f}")


def render_markdown(reports: Sequence[SweepReport], out: Path) -> str:
    """report.md: provenance, tables in Markdown, figures linked (relative to `out`)."""
    lines = ["# LoRA reproduction report", "",
             f"Hu et al. 2021 (arXiv {ARXIV}); paper values from `analysis/paper/*.csv`.", ""]
    for r in reports:
        p = r.prov
        missing = "" if p.missing is None else f", {p.missing} missing of {p.expected}"
        lines += [f"## Sweep {r.name}", "", f"- sweep: `{p.sweep}`",
                  f"- jobs: {len(p.complete)} complete, {len(p.failed)} failed, "
                  f"{len(p.incomplete)} incomplete{missing}",
                  *[f"  - failed {job}: {err}" for job, err in p.failed.items()],
                  f"- model: {'; '.join(p.models)}; base fingerprint "
                  f"`{', '.join(p.fingerprints) or '–'}`", f"- data: {'; '.join(p.data)}",
                  f"- git commit: `{', '.join(p.commits) or 'unknown'}`; device: "
                  f"{', '.join(p.devices)}",
                  "- versions: " + ", ".join(f"{k} {v}" for k, v in p.versions.items()),
                  f"- {'GPU' if p.on_gpu else 'compute (CPU)'} time: {r.compute}",
                  f"- W&B: {p.wandb_group or 'no online group'}", ""]
        for part in r.parts:
            lines += [f"### {part.title}", ""]
            lines += [f"{text}" for text in (part.note, *part.claims) if text]
            for table in part.frames.values():
                lines += ["", table.to_markdown(index=table.index.name is not None), ""]
            lines += [f"![{f.name}]({f.relative_to(out)})" for f in part.figures] + [""]
    return "\n".join(lines) + "\n"


def write_report(reports: Sequence[SweepReport], out: Path, seconds: float) -> list[Path]:
    """report.html, report.md and compare_*.tex into `out`; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    html, md = out / "report.html", out / "report.md"
    write_atomic(html, render_html(reports, seconds))
    write_atomic(md, render_markdown(reports, out))
    files = [html, md]
    for r in reports:
        where = out / r.name if len(reports) > 1 else out  # beside the sweep's own files
        for part in r.parts:
            for stem, frame in part.frames.items():
                if stem.startswith("compare_"):
                    files.append(tables.write_table(frame, where / f"{stem}.tex"))
    return files


def log_report(mode: str, sweep_dirs: Sequence[Path], files: Sequence[Path]) -> None:
    """Log the report to each sweep's W&B group as an artifact (type "report") and its HTML
    as a W&B Html panel; nothing when disabled."""
    if mode == "disabled":
        return
    import wandb

    for sweep in sweep_dirs:
        run = wandb.init(project=cli.PROJECT, job_type="report", mode=mode, dir=str(sweep),
                         group=sweep.name, name=f"report-{sweep.name}",
                         settings=wandb.Settings(silent=True, console="off"))
        try:
            artifact = wandb.Artifact(f"report-{sweep.name}", type="report")
            for path in files:
                artifact.add_file(str(path))
            run.log_artifact(artifact)
            html = next(p for p in files if p.suffix == ".html")
            run.log({"report": wandb.Html(html.read_text())})
        finally:
            run.finish()


# ---------------------------------------------------------------- command


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    sweeps = args.sweep or [None]
    if args.out is None:
        first = load_runs(sweeps[0])[0] if len(sweeps) == 1 else None
        args.out = cli.FIGURES / (first.name if first else "report")
    if args.screenshot is not None and browser.chromium() is None:
        raise UserError("--screenshot needs Chromium (chromium, chromium-browser or "
                        "google-chrome on PATH); e.g. apt-get install chromium")
    multi = len(sweeps) > 1
    reports = []
    for sweep in sweeps:
        sub = args.out / Path(sweep).name if multi else args.out
        reports.append(build_sweep(sweep, sub))
    files = write_report(reports, args.out, time.perf_counter() - start)
    sweep_dirs = [Path(r.prov.sweep) for r in reports]
    log_report(cli.wandb_mode(args.wandb), sweep_dirs, files)
    if args.screenshot is not None:
        browser.screenshot(files[0], args.screenshot)
        files.append(args.screenshot)
    print(f"wrote {files[0]} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = cli.base_parser(COMMAND, __doc__, sweeps="*")
    parser.add_argument("--screenshot", type=Path, default=None,
                        help="also render the report's first screen to this PNG (Chromium)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m analysis.report`: 0 on success, 2 with one `error:` line otherwise."""
    return cli.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
