"""Export a run's adapter for other tools.

    python -m lora_repro.export peft RUN_DIR OUT_DIR [--save-base BASE_DIR]

``peft`` writes OUT_DIR/adapter_config.json and adapter_model.safetensors, which
``PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), OUT_DIR)`` loads (then
``merge_and_unload()`` gives a plain GPT-2), plus lora_repro.json (the run's config, so the
analysis commands pair the export with its run) and the run's task-trained tokenizer/ if
any. The base named in the adapter is the run's model.name; a run on a random-init base
needs --save-base, which writes the base model (and its tokenizer) to BASE_DIR and names
that directory instead. The conversion is exact (`lora_repro.lora.peft_format`). Mistakes
print ``error: <message>`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lora_repro import rundir
from lora_repro.errors import UserError


def export_peft(run_dir: Path, out_dir: Path, save_base: Path | None = None) -> Path:
    """Write the LoRA run at `run_dir` as a peft adapter directory `out_dir`; returns it."""
    from lora_repro.lora import adapter_factors, read_adapter
    from lora_repro.lora.peft_files import write_peft
    from lora_repro.run_reader import adapter_path, base_model, run_config, run_tokenizer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = run_config(run_dir)
    if cfg.method != "lora":
        raise UserError(f"run={run_dir} is method={cfg.method}: no adapter to export (its "
                        f"{rundir.MODEL}/ directory is already a Hugging Face model)")
    if save_base is None and cfg.model.init != "pretrained":
        raise UserError(f"run={run_dir} has model.init={cfg.model.init}: no hub id or directory "
                        "holds its base; pass --save-base DIR to write it there")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty; give a new directory")
    tensors, meta = read_adapter(adapter_path(run_dir))
    local = Path(cfg.model.name).expanduser()
    base = str(local.resolve()) if local.exists() else cfg.model.name  # a hub id stays as is
    if save_base is not None:
        model = base_model(run_dir, cfg)
        model.save_pretrained(save_base)
        run_tokenizer(run_dir, cfg).save_pretrained(save_base)
        base = str(Path(save_base).resolve())
    summary = rundir.read_json(run_dir / rundir.SUMMARY) if (run_dir / rundir.SUMMARY
                                                             ).is_file() else {}
    origin = {"config": summary.get("config") or rundir.read_json(run_dir / rundir.CONFIG),
              "base_fingerprint": summary.get("base_fingerprint"), "run": str(run_dir)}
    tokenizer = [run_dir / rundir.TOKENIZER] if (run_dir / rundir.TOKENIZER).is_dir() else []
    return write_peft(out_dir, adapter_factors(tensors, meta), meta, base, origin, tokenizer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_repro.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = parser.add_subparsers(dest="format", required=True)
    peft = formats.add_parser("peft", help="a peft LoRA adapter directory")
    peft.add_argument("run_dir", type=Path, help="a LoRA run directory (runs/<name>/<job>)")
    peft.add_argument("out_dir", type=Path, help="the new adapter directory")
    peft.add_argument("--save-base", type=Path, default=None,
                      help="also write the base model here and name it as the adapter's base")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and export; a ``UserError`` prints one line and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        out = export_peft(args.run_dir, args.out_dir, args.save_base)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}/ (peft adapter)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
