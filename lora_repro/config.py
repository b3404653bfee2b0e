"""The training config schema: typed dataclasses, the paper's defaults, and validation.

Hydra composes `conf/` on top of these dataclasses (registered as the structured schema
`base_config`), so a misspelled key or a wrong type fails at composition. `validate` then
checks values, with one `UserError` line each, before any model or data is loaded.

Defaults are the paper's GPT-2 M E2E setting (Hu et al. 2021, Table 11): AdamW, lr 2e-4,
weight decay 0.01, batch 8, 5 epochs, 500 warmup steps, linear decay, label smoothing 0.1,
LoRA on W_q and W_v with r = 4, alpha = 32, dropout 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from lora_repro.data.references import check_references, saved_references
from lora_repro.errors import UserError
from lora_repro.lora.targets import parse_targets


@dataclass
class ModelConfig:
    id: str = "gpt2-medium"  # short name used in run names
    name: str = "gpt2-medium"  # hub id or local directory of a GPT2LMHeadModel
    tokenizer: str = "gpt2-medium"  # hub id, local directory, "byt5" (bytes, no files), or
    # "bpe": a byte-level BPE of `vocab_size` trained on the task's train split (offline models)
    vocab_size: int = 1024
    init: str = "pretrained"  # pretrained | random (shape below, seeded by init_seed) |
    # synthetic: that random init pretrained here on the synthetic domain's text, cached
    # (`lora_repro/synthetic_base.py`; needs tokenizer "bpe", trained on the same text)
    n_layer: int = 24
    n_embd: int = 1024
    n_head: int = 16
    n_positions: int = 1024
    init_seed: int = 0
    dropout: float = 0.0  # dropout inside the frozen base model; the paper's code has none
    attn_implementation: str = "sdpa"  # sdpa | eager
    pretrain_steps: int = 600  # init=synthetic: steps of pretraining
    cache_dir: str = "~/.cache/lora_repro/bases"  # init=synthetic: where pretrained bases live


@dataclass
class TaskConfig:
    name: str = "e2e"  # e2e | webnlg | dart | synthetic | corpus
    data_dir: str | None = None  # local files in the official format; None = the hub
    train_file: str = "trainset.csv"  # file names inside data_dir (task yaml: official names)
    valid_file: str | None = "devset.csv"  # None: no validation file (see valid_fraction)
    test_file: str | None = "testset_w_refs.csv"  # None: no test split
    valid_fraction: float = 0.0  # > 0: carve validation from the train file, by source
    max_train_examples: int | None = None  # seeded subsets for quick runs
    max_valid_examples: int | None = None
    max_test_sources: int | None = None
    n_train: int = 2000  # synthetic: sources per split, and references per source
    n_valid: int = 100
    n_test: int = 100
    refs_per_source: int = 3
    seed: int = 0  # seeds the data split, subsets and the synthetic generator (not training)
    max_length: int = 512  # tokens per example (prompt + target + eos)
    # official: source ids, eos id, " " + target, eos (gpt2_encode.py --add_bos --add_eos)
    # | text: source + " ||", " " + target, eos (runs saved without this key used it)
    prompt_format: str = "official"
    length_penalty: float = 0.9  # beam search; the paper's Table 11: 0.9 E2E, 0.8 WebNLG/DART
    metrics: str = "e2e"  # e2e (E2E script) | generation_eval (WebNLG, DART) | bleu_meteor
    references: str = "paper"  # paper: E2E text tokenized as the LoRA code's files | original
    paths: list[str] = field(default_factory=list)  # corpus: .txt/.txt.gz/.txt.xz files, globs
    block_size: int = 512  # corpus: tokens per packed block
    cache_dir: str | None = "~/.cache/lora_repro/corpus"  # corpus: tokenized cache; None: off


@dataclass
class EvalConfig:
    test: bool = True  # decode and score the test set at the end of training
    beam: int = 10
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64
    batch_size: int = 32  # test sources decoded at once
    # official: the paper's gpt2_beam.py rules (lora_repro.beam_search) | hf: transformers'
    # generate as before 2026-12 (no renormalization after the n-gram ban; finished beams
    # take no slot), kept to compare
    decoder: str = "official"
    # An output also ends at these texts, besides eos: as a stop id if the text is one token
    # ("\n\n" is GPT-2's 628: the official commands' --eos_token_id 628), and as a cut of the
    # decoded text (gpt2_decode.py). [] = eos only.
    stop_texts: list[str] = field(default_factory=lambda: ["\n\n"])
    # fp32: as the official decoder (bf16 logits reorder near-equal beams) | auto | bf16, as
    # the top-level `precision`
    precision: str = "fp32"
    base: bool = False  # also decode and score (BLEU, NIST) the base model before training


@dataclass
class WandbConfig:
    mode: str | None = None  # online | offline | disabled; None: online with an API key
    project: str = "lora-repro"
    entity: str | None = None


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    every: int = 50  # optimizer steps between metrics.jsonl lines


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    name: str = "default"  # runs/<name>/<job>; experiment presets set it
    method: str = "lora"  # lora | full (full fine-tuning, every parameter trains)
    targets: str = "qv"
    rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.1
    seed: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.01
    epochs: int = 5
    max_steps: int | None = None  # stop after this many optimizer steps (smoke, benchmarks)
    batch_size: int = 8
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 500
    lr_schedule: str = "linear"  # linear (the paper) | cosine, both to 0 after warm-up
    adam_beta2: float = 0.999
    max_time_min: float | None = None  # fit the run (and its lr schedule) into this wall time
    label_smoothing: float = 0.1
    max_grad_norm: float = 0.0  # 0 = no clipping (the paper's code default)
    checkpoint_every: int = 1000  # optimizer steps between checkpoints (also at epoch ends)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool | None = None  # the fast path (torch.compile); None = on for CUDA
    threads: int | None = None  # CPU threads for torch; None = torch's default


ALLOWED = {
    "method": ("lora", "full"),
    "model.init": ("pretrained", "random", "synthetic"),
    "model.attn_implementation": ("sdpa", "eager"),
    "task.metrics": ("e2e", "generation_eval", "bleu_meteor"),
    "task.prompt_format": ("official", "text"),
    "eval.decoder": ("official", "hf"),
    "eval.precision": ("auto", "fp32", "bf16"),
    "precision": ("auto", "fp32", "bf16"),
    "lr_schedule": ("linear", "cosine"),
    "logger.wandb.mode": (None, "online", "offline", "disabled"),
}


def _get(cfg: TrainConfig, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check values that types cannot; raise one `UserError` line naming the key."""
    for key, allowed in ALLOWED.items():
        if _get(cfg, key) not in allowed:
            raise UserError(f"{key}={_get(cfg, key)!r}: allowed values are {allowed}")
    check_references(cfg.task.references, cfg.task.name)
    if cfg.method == "lora":
        cfg.targets = parse_targets(cfg.targets)
        if cfg.rank < 1:
            raise UserError(f"rank={cfg.rank}: must be an integer >= 1")
        if cfg.alpha <= 0:
            raise UserError(f"alpha={cfg.alpha}: must be > 0")
        if not 0 <= cfg.dropout < 1:
            raise UserError(f"dropout={cfg.dropout}: must be in [0, 1)")
    positive = ("lr", "epochs", "batch_size", "grad_accum", "eval.beam", "eval.max_new_tokens",
                "eval.batch_size", "task.max_length", "task.block_size", "logger.every",
                "model.n_positions", "model.pretrain_steps")
    for key in positive:
        if not _get(cfg, key) > 0:
            raise UserError(f"{key}={_get(cfg, key)}: must be > 0")
    for key in ("weight_decay", "warmup_steps", "max_grad_norm", "model.dropout",
                "checkpoint_every", "eval.no_repeat_ngram_size", "seed", "task.seed",
                "model.init_seed"):
        if _get(cfg, key) < 0:
            raise UserError(f"{key}={_get(cfg, key)}: must be >= 0")
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError(f"label_smoothing={cfg.label_smoothing}: must be in [0, 1)")
    if not 0 <= cfg.adam_beta2 < 1:
        raise UserError(f"adam_beta2={cfg.adam_beta2}: must be in [0, 1)")
    if not 0 <= cfg.task.valid_fraction < 1:
        raise UserError(f"task.valid_fraction={cfg.task.valid_fraction}: must be in [0, 1)")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UserError(f"max_steps={cfg.max_steps}: must be >= 1 or null")
    if cfg.max_time_min is not None and not cfg.max_time_min > 0:
        raise UserError(f"max_time_min={cfg.max_time_min}: must be > 0 or null")
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"threads={cfg.threads}: must be >= 1 or null")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise UserError(f"device={cfg.device!r}: allowed values are auto, cpu, cuda, cuda:N")
    if cfg.model.init == "synthetic" and cfg.model.tokenizer != "bpe":
        raise UserError(f"model.tokenizer={cfg.model.tokenizer!r}: model.init=synthetic brings "
                        "its own tokenizer; set model.tokenizer=bpe")
    if cfg.model.init != "pretrained":
        check_positions(cfg, cfg.model.n_positions)
    return cfg


def check_positions(cfg: TrainConfig, n_positions: int) -> None:
    """Every sequence must fit the model's `n_positions` position embeddings (1024 for
    GPT-2): a block of the corpus, or a training example and, when the test set is decoded,
    a prompt of up to `task.max_length` tokens plus `eval.max_new_tokens`."""
    if cfg.task.name == "corpus":
        what, need = f"task.block_size={cfg.task.block_size}", cfg.task.block_size
    else:
        what, need = f"task.max_length={cfg.task.max_length}", cfg.task.max_length
        if cfg.eval.test:
            what += f" + eval.max_new_tokens={cfg.eval.max_new_tokens}"
            need += cfg.eval.max_new_tokens
    if need > n_positions:
        raise UserError(f"{what} tokens do not fit the model's {n_positions} positions "
                        "(model.n_positions); shorten them")


# Keys added after runs were saved: what a saved run without the key did (`upgrade_saved`).
# Runs before the official prompt format used the " ||" text (a corpus run has no prompts).
LEGACY = {("task", "prompt_format"): lambda task: "official" if task.get("name") == "corpus"
           else "text",
          ("task", "references"): saved_references}


def upgrade_saved(saved: dict) -> dict:
    """A saved config or identity dict (summary.json, run_config.json, a checkpoint), with
    each key it predates set to what that run did: read back, an old run is the run it was."""
    saved = {**saved, **{k: dict(v) for k, v in saved.items() if isinstance(v, dict)}}
    for (group, key), value in LEGACY.items():
        if isinstance(saved.get(group), dict) and key not in saved[group]:
            saved[group][key] = value(saved[group])
    return saved


def register() -> None:
    """Register the schema with Hydra (conf/config.yaml lists `base_config` first)."""
    ConfigStore.instance().store(name="base_config", node=TrainConfig)
