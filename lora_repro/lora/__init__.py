"""LoRA for Hugging Face GPT-2 with per-matrix targets on the fused qkv projection.

    from lora_repro.lora import apply_lora, merge_lora, save_adapter, delta_weights
    apply_lora(model, targets="qv", rank=4, alpha=32, dropout=0.1)

See the README section "LoRA API" for the whole surface.
"""

from lora_repro.lora.adapter import adapter_factors, load_adapter, read_adapter, save_adapter
from lora_repro.lora.layer import LoRAConv1D, delta_weight
from lora_repro.lora.model import (
    LoRASettings,
    apply_lora,
    base_weights,
    count_trainable,
    delta_weights,
    lora_factors,
    lora_layers,
    lora_settings,
    merge_lora,
    unmerge_lora,
    unwrap_lora,
)
from lora_repro.lora.targets import TARGETS, parse_targets

__all__ = [
    "TARGETS",
    "LoRAConv1D",
    "LoRASettings",
    "adapter_factors",
    "apply_lora",
    "base_weights",
    "count_trainable",
    "delta_weight",
    "delta_weights",
    "load_adapter",
    "lora_factors",
    "lora_layers",
    "lora_settings",
    "merge_lora",
    "parse_targets",
    "read_adapter",
    "save_adapter",
    "unmerge_lora",
    "unwrap_lora",
]
