"""Evaluation commands: ``score`` (E2E metrics of a hypothesis file); ``decode`` to come.

    python -m lora_repro.evaluate score --refs testset_w_refs.csv --hyp outputs.txt
        [--metrics BLEU,NIST,METEOR,ROUGE_L,CIDEr]

prints one JSON object, e.g. ``{"BLEU": 0.66, "NIST": 8.5, ...}``, on the official E2E
scale (``measure_scores.py -p`` of github.com/tuetschek/e2e-metrics). Mistakes a user can
fix print ``error: <message>`` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lora_repro.errors import UserError
from lora_repro.metrics import E2E_METRICS, check_metrics, read_hyps, read_refs_csv, score_e2e
from lora_repro.metrics.coco import require_java


def run_score(args: argparse.Namespace) -> int:
    """``score``: validate everything cheap first, then run the scorers once."""
    metrics = check_metrics(args.metrics.split(","))
    _, refs = read_refs_csv(args.refs)
    hyps = read_hyps(args.hyp)
    if len(hyps) != len(refs):
        raise UserError(f"{args.hyp} has {len(hyps)} lines but {args.refs} has {len(refs)} MRs; "
                        "give one output line per MR, in the order of the references file")
    require_java(metrics)
    print(json.dumps(score_e2e(refs, hyps, metrics)))
    return 0


def add_score_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "score", help="E2E metrics of a hypothesis file against a references CSV",
        description="Score one output line per MR against the references, as the official "
                    "E2E script (measure_scores.py -p) does.")
    parser.add_argument("--refs", required=True,
                        help="references CSV with columns mr,ref (several rows per MR)")
    parser.add_argument("--hyp", required=True, help="text file, one output per MR")
    parser.add_argument("--metrics", default=",".join(E2E_METRICS),
                        help=f"comma-separated subset of {','.join(E2E_METRICS)}")
    parser.set_defaults(func=run_score)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_repro.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_score_parser(subparsers)
    # ---- decode --------------------------------------------------------------------
    # Add the `decode` subcommand here: `add_decode_parser(subparsers)`, with positional
    # `run=PATH` and `key=value` overrides and `set_defaults(func=run_decode)`.
    # ---------------------------------------------------------------------------------
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
