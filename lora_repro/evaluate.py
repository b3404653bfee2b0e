"""Evaluation commands: ``score`` a hypothesis file or a run, ``decode`` a run's test set.

    python -m lora_repro.evaluate score --refs testset_w_refs.csv --hyp outputs.txt
        [--metrics BLEU,NIST,METEOR,ROUGE_L,CIDEr] [--references paper|original]
    python -m lora_repro.evaluate score --task webnlg|dart --refs test.json --hyp outputs.txt
        [--train train.json] [--metrics BLEU,METEOR,TER]
    python -m lora_repro.evaluate decode run=runs/smoke/r4-qv-s1 [eval.beam=5 ...] [--tag T]
    python -m lora_repro.evaluate score run=runs/smoke/r4-qv-s1

``score`` prints one JSON object, e.g. ``{"BLEU": 0.66, "NIST": 8.5, ...}``, on the official
E2E scale (``measure_scores.py -p`` of github.com/tuetschek/e2e-metrics); with ``--task
webnlg|dart``, BLEU, METEOR and TER as the paper's Tables 13-14 (``metrics.generation_eval``),
for WebNLG also ``BLEU_S``, ``BLEU_U``, ... (seen / unseen categories). ``decode`` loads
the run's base model and adapter, merges, beam-decodes every test source into the run's
``predictions.txt``, scores it and adds the metrics to ``summary.json``; ``score run=``
re-scores an existing ``predictions.txt`` (e.g. decoded on a GPU machine without Java).
``--references paper`` (the default) scores against the references tokenized as the LoRA
code's test.txt, as the paper did; ``original`` against the CSV text (the E2E challenge's
way). The hypotheses are scored as they are. ``score run=`` uses the run's task.references;
``score run=DIR task.references=original`` prints the other way without touching the summary.
``decode --tag T`` is a side decode (other settings, e.g. ``eval.decoder=hf``): it writes
``predictions-T.txt`` and ``decode-T.json`` (metrics, settings, and ``changed_outputs``: how
many lines differ from ``predictions.txt``) and leaves ``predictions.txt`` and
``summary.json`` as they are.
Mistakes a user can fix print ``error: <message>`` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lora_repro import rundir
from lora_repro.data.references import REFERENCES, check_references, text_transform
from lora_repro.errors import UserError
from lora_repro.metrics import (
    E2E_METRICS,
    GENERATION_EVAL_METRICS,
    check_metrics,
    read_hyps,
    read_refs_csv,
    score_e2e,
    score_generation_eval,
)
from lora_repro.metrics.coco import require_java


def split_run_args(args: Sequence[str]) -> tuple[Path, list[str]]:
    """``run=PATH`` and the ``key=value`` config overrides among positional arguments."""
    runs = [a.split("=", 1)[1] for a in args if a.startswith("run=")]
    overrides = [a for a in args if not a.startswith("run=")]
    if len(runs) != 1:
        raise UserError("give exactly one run=PATH (a job directory under runs/)")
    bad = [a for a in overrides if "=" not in a]
    if bad:
        raise UserError(f"{bad[0]!r}: overrides are key=value, e.g. eval.beam=5")
    return Path(runs[0]), overrides


def _check_files(run_dir: Path) -> None:
    """A complete run's files against the checksums in its summary.json (`UserError`)."""
    path = run_dir / rundir.SUMMARY
    if path.is_file():
        rundir.verify_artifacts(run_dir, rundir.read_json(path))


def _update_summary(run_dir: Path, metrics: dict, decoded: bool = False) -> None:
    """Add `metrics` to summary.json; `decoded`: predictions.txt was just rewritten, so its
    checksum is too."""
    path = run_dir / rundir.SUMMARY
    if path.is_file():
        summary = rundir.read_json(path)
        summary["metrics"].update(metrics)
        if decoded and "artifacts" in summary:
            summary["artifacts"] |= rundir.checksums(run_dir, [rundir.PREDICTIONS])
        rundir.write_json(path, summary)


def _changed_lines(a: Path, b: Path) -> int | None:
    """How many lines of `a` differ from the same line of `b` (None if `b` is absent)."""
    if not b.is_file():
        return None
    old, new = b.read_text().splitlines(), a.read_text().splitlines()
    return sum(x != y for x, y in zip(new, old, strict=False)) + abs(len(new) - len(old))


def run_decode(args: argparse.Namespace) -> int:
    """``decode run=DIR``: decode the run's test set, score it, update its summary (or, with
    ``--tag``, write the side files named in the module docstring)."""
    from dataclasses import asdict

    from lora_repro import run_reader
    from lora_repro.config import validate
    from lora_repro.decoding import decode_and_score
    from lora_repro.modeling import resolve_device
    from lora_repro.trainer import task_data

    run_dir, overrides = split_run_args(args.args)
    if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.tag):
        raise UserError(f"--tag {args.tag!r}: use letters, digits, '_', '.', '-'")
    cfg = validate(run_reader.run_config(run_dir, overrides))
    _check_files(run_dir)
    device = resolve_device(cfg.device)
    test = task_data(cfg.task).test
    if not test:
        raise UserError(f"task {cfg.task.name!r} of run={run_dir} has no test split")
    model = run_reader.trained_model(run_dir, cfg).to(device)
    t0 = time.perf_counter()
    predictions = rundir.PREDICTIONS if args.tag is None else f"predictions-{args.tag}.txt"
    tokenizer = run_reader.run_tokenizer(run_dir, cfg)
    metrics = decode_and_score(model, tokenizer, test, cfg, run_dir, device,
                               predictions=predictions)
    metrics["decode_s"] = time.perf_counter() - t0
    if args.tag is None:
        _update_summary(run_dir, metrics, decoded=True)
    else:
        metrics["changed_outputs"] = _changed_lines(run_dir / predictions,
                                                    run_dir / rundir.PREDICTIONS)
        rundir.write_json(run_dir / f"decode-{args.tag}.json", {
            "metrics": metrics, "overrides": overrides, "eval": asdict(cfg.eval),
            "prompt_format": cfg.task.prompt_format, "length_penalty": cfg.task.length_penalty})
    print(json.dumps(metrics))
    return 0


def score_run(run_dir: Path, overrides: list[str]) -> dict:
    """Score a run's ``predictions.txt`` against its task's test references."""
    from lora_repro import run_reader
    from lora_repro.data.records import seen_flags
    from lora_repro.decoding import score
    from lora_repro.trainer import task_data

    cfg = run_reader.run_config(run_dir, overrides)
    check_references(cfg.task.references, cfg.task.name)
    _check_files(run_dir)
    path = run_dir / rundir.PREDICTIONS
    test = task_data(cfg.task).test
    hyps = read_hyps(path, len(test))
    if len(hyps) != len(test):
        raise UserError(f"{path} has {len(hyps)} lines, the test split {len(test)} sources")
    metrics = score(cfg.task.metrics, [list(t.references) for t in test], hyps, seen_flags(test))
    if cfg.task.references == run_reader.run_config(run_dir).task.references:
        _update_summary(run_dir, metrics)  # scores against other references are only printed
    return metrics


def run_score(args: argparse.Namespace) -> int:
    """``score``: validate everything cheap first, then run the scorers once."""
    if args.args:
        print(json.dumps(score_run(*split_run_args(args.args))))
        return 0
    if not (args.refs and args.hyp):
        raise UserError("give --refs REFS.csv and --hyp HYP.txt, or run=PATH")
    if args.task != "e2e":
        print(json.dumps(score_data_to_text(args)))
        return 0
    metrics = check_metrics((args.metrics or ",".join(E2E_METRICS)).split(","))
    prepare = text_transform(check_references(args.references, "e2e"), "test")
    _, refs = read_refs_csv(args.refs)
    if prepare is not None:
        refs = [[prepare(ref) for ref in group] for group in refs]
    hyps = read_hyps(args.hyp, len(refs))
    if len(hyps) != len(refs):
        raise UserError(f"{args.hyp} has {len(hyps)} lines but {args.refs} has {len(refs)} MRs; "
                        "give one output line per MR, in the order of the references file")
    require_java(metrics)
    print(json.dumps(score_e2e(refs, hyps, metrics)))
    return 0


def _read_json_task(task: str, path: Path, what: str):
    """The examples of an official WebNLG / DART json file; `UserError` if unreadable."""
    from lora_repro.data.tasks import READERS

    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        return READERS[task][0](path)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{what} file {path} is not a {task} json ({err})") from None


def score_data_to_text(args: argparse.Namespace) -> dict:
    """``score --task webnlg|dart``: the paper's scores of ``--hyp`` (one line per distinct
    source, in file order) against the official json ``--refs``. WebNLG's seen / unseen
    parts come from the categories of ``--train`` (default: the official train file beside
    ``--refs``, when present)."""
    from lora_repro.data import webnlg
    from lora_repro.data.records import group_by_source

    metrics = check_metrics((args.metrics or ",".join(GENERATION_EVAL_METRICS)).split(","),
                            GENERATION_EVAL_METRICS)
    if args.train and args.task != "webnlg":
        raise UserError("--train gives WebNLG's seen categories; drop it for --task dart")
    refs_path = Path(args.refs)
    train = Path(args.train) if args.train else refs_path.with_name(webnlg.OFFICIAL_FILES["train"])
    seen = None
    if args.task == "webnlg" and (args.train or train.is_file()):
        seen = {ex.category for ex in _read_json_task("webnlg", train, "--train")}
    test = group_by_source(_read_json_task(args.task, refs_path, "references"), seen)
    hyps = read_hyps(args.hyp)
    if len(hyps) != len(test):
        raise UserError(f"{args.hyp} has {len(hyps)} lines but {refs_path} has {len(test)} "
                        "distinct sources; give one output line per source, in file order")
    require_java(metrics, others="BLEU,TER")
    if args.task == "webnlg" and seen is None:
        print(f"note: no {train}: scoring all sources only (give --train for seen/unseen)",
              file=sys.stderr)
    return score_generation_eval([list(t.references) for t in test], hyps,
                                 None if seen is None else [t.seen for t in test], metrics)


def add_score_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "score", help="E2E metrics of a hypothesis file against a references CSV",
        description="Score one output line per MR against the references, as the official "
                    "E2E script (measure_scores.py -p) does.")
    parser.add_argument("args", nargs="*", metavar="run=PATH",
                        help="score a run's predictions.txt instead (and update its summary)")
    parser.add_argument("--refs", help="references CSV with columns mr,ref (several rows per MR)"
                        "; for --task webnlg|dart the official test json")
    parser.add_argument("--hyp", help="text file, one output per MR (or distinct source)")
    parser.add_argument("--metrics", help=f"comma-separated subset of {','.join(E2E_METRICS)}"
                        f" (webnlg, dart: of {','.join(GENERATION_EVAL_METRICS)}); default all")
    parser.add_argument("--task", choices=("e2e", "webnlg", "dart"), default="e2e",
                        help="which official scorer (default e2e)")
    parser.add_argument("--train", help="webnlg: the train json whose categories are 'seen' "
                        "(default: train.json beside --refs, if there)")
    parser.add_argument("--references", default="paper", metavar="|".join(REFERENCES),
                        help="e2e: paper (default) tokenizes the references as the LoRA code's "
                             "test.txt, as the paper scored; original: the CSV text as it is")
    parser.set_defaults(func=run_score)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_repro.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_score_parser(subparsers)
    decode = subparsers.add_parser(
        "decode", help="beam-decode a run's test set, score it, update its summary.json",
        description="Load the run's base model and adapter, merge, and decode every test "
                    "source with the paper's beam search (config keys eval.* and "
                    "task.length_penalty; override them as key=value).")
    decode.add_argument("args", nargs="+", metavar="run=PATH [key=value ...]")
    decode.add_argument("--tag", help="a side decode: write predictions-TAG.txt and "
                        "decode-TAG.json, leave predictions.txt and summary.json alone")
    decode.set_defaults(func=run_decode)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; a ``UserError`` becomes exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
