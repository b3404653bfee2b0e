"""lora-repro: LoRA on GPT-2 with per-matrix targets, and the LoRA paper's analysis."""

__version__ = "0.1.0"
