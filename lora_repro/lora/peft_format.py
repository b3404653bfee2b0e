"""Conversion between lora-repro adapters and peft's LoRA format for GPT-2 (pure tensor code).

peft adapts whole modules: one A (r' x d_in) and one B (d_out x r') per module, scaled by
lora_alpha' / r'. For GPT-2 its modules are ``attn.c_attn`` (fused q, k, v: d_out = 3 d),
``attn.c_proj`` (W_o), ``mlp.c_fc`` and ``mlp.c_proj``. Its state-dict keys are

    base_model.model.transformer.h.{i}.{module}.lora_A.weight   (r', d_in)
    base_model.model.transformer.h.{i}.{module}.lora_B.weight   (d_out, r')

in the `nn.Linear` convention (peft's ``fan_in_fan_out=True`` transposes only dW for the
Conv1D weight). Ours -> peft is exact: k adapted slices of c_attn at rank r become one
adapter of rank r' = k r with A' = [A_1; ...; A_k] and B' block-diagonal (B_s in the rows
of slice s, columns s r .. (s + 1) r - 1), and lora_alpha' = k alpha so alpha'/r' = alpha/r.
peft -> ours splits B' into its q, k, v row blocks: dW_s = (alpha'/r') B'_s A'. Where B'
is block-diagonal (an adapter exported by lora-repro), that gives per-matrix factors again;
otherwise q, k and v share A', and each matrix's factors are taken from its dW's SVD
(A_s = S^1/2 Vh, B_s = U S^1/2, rank r'), so A's right-singular vectors are dW's.
"""

from __future__ import annotations

import math
import re

import torch

from lora_repro.errors import UserError
from lora_repro.lora.adapter import FORMAT
from lora_repro.lora.targets import TARGETS, group_by_module, parse_targets

Factors = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
PREFIX = "base_model.model."
FUSED = "attn.c_attn"
KEY = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.)?h\.(\d+)\."
                 r"(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_([AB])\.weight$")
UNSUPPORTED = {"use_dora": "DoRA", "use_qalora": "QA-LoRA", "modules_to_save": "modules_to_save",
               "layer_replication": "layer_replication", "trainable_token_indices":
               "trainable tokens"}
# What a structure note says: the analysis reads it from the adapter's metadata.
SVD_NOTE = ("peft adapts the fused c_attn with one A shared by q, k, v: each matrix's factors "
            "are taken from its dW's SVD (phi compares dW's right-singular vectors)")


def peft_key(layer: int, module: str, name: str) -> str:
    """``base_model.model.transformer.h.{layer}.{module}.lora_{name}.weight``."""
    return f"{PREFIX}transformer.h.{layer}.{module}.lora_{name}.weight"


# ---------------------------------------------------------------- ours -> peft


def to_peft(factors: Factors, targets: str, rank: int, alpha: float
            ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """A lora-repro adapter as peft tensors, and (r', lora_alpha') per peft module.

    Args:
        factors: A (r x d_in), B (d_out x r) per (layer, letter), as `lora_factors` gives.
        targets, rank, alpha: the adapter's settings (dW = alpha / rank * B @ A).

    Returns:
        tensors: peft key -> lora_A (r', d_in) or lora_B (n d_out, r'), r' = k rank for the
            k adapted slices of a module (n its slices: 3 for c_attn, else 1).
        modules: module path ("attn.c_attn") -> (r', alpha') with alpha' / r' = alpha / rank.
    """
    groups = group_by_module(targets)
    layers = sorted({layer for layer, _ in factors})
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        for module, group in groups.items():
            a = torch.cat([factors[(layer, t.letter)][0] for t in group])  # (k r, d_in)
            blocks_b = [factors[(layer, t.letter)][1] for t in group]  # each (d_out, r)
            d_out = blocks_b[0].shape[0]
            b = a.new_zeros(group[0].n_slices * d_out, len(group) * rank)
            for j, (t, b_t) in enumerate(zip(group, blocks_b, strict=True)):
                rows = slice(t.slice_index * d_out, (t.slice_index + 1) * d_out)
                b[rows, j * rank:(j + 1) * rank] = b_t
            tensors[peft_key(layer, module, "A")] = a.contiguous()
            tensors[peft_key(layer, module, "B")] = b
    modules = {m: (len(g) * rank, len(g) * alpha) for m, g in groups.items()}
    return tensors, modules


def peft_config(modules: dict[str, tuple[int, float]], dropout: float, base: str) -> dict:
    """peft's adapter_config.json for `to_peft`'s modules: the most common (r, alpha) as the
    default, the others in rank_pattern / alpha_pattern (keys are module paths, which peft
    matches as suffixes of full module names, so "attn.c_proj" never matches the MLP's)."""
    settings = list(modules.values())
    r, alpha = max(settings, key=settings.count)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "target_modules": sorted(modules), "r": r, "lora_alpha": alpha,
        "rank_pattern": {m: s[0] for m, s in modules.items() if s[0] != r},
        "alpha_pattern": {m: s[1] for m, s in modules.items() if s[1] != alpha},
        "lora_dropout": dropout, "fan_in_fan_out": True, "bias": "none", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None,
    }


# ---------------------------------------------------------------- peft -> ours


def check_config(config: dict, where: str) -> None:
    """Refuse peft adapters whose math is not (alpha / r) B A on GPT-2's Conv1D weights."""
    if config.get("peft_type") != "LORA":
        raise UserError(f"{where}: peft_type={config.get('peft_type')!r}; only LORA adapters "
                        "can be read")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise UserError(f"{where}: uses {what} ({key}={config[key]!r}), which lora-repro "
                            "cannot represent; allowed: plain LoRA")
    if config.get("bias", "none") != "none":
        raise UserError(f"{where}: bias={config['bias']!r} trains biases; allowed: bias='none'")


def _pattern(patterns: dict, name: str, default):
    """peft's rank_pattern / alpha_pattern lookup (`peft.utils.other.get_pattern_key`)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _scaling(config: dict, layer: int, module: str, r: int) -> float:
    """alpha / r of one module of one layer (alpha / sqrt(r) with rsLoRA)."""
    alpha = _pattern(config.get("alpha_pattern"), f"transformer.h.{layer}.{module}",
                     config.get("lora_alpha", 8))
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def parse_keys(tensors: dict[str, torch.Tensor], where: str
               ) -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """peft tensors -> module path -> layer -> (A (r', d_in), B (d_out, r')).

    Raises `UserError` naming the modules of another architecture or that cannot be mapped,
    and for a module adapted in some layers only."""
    found: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    unmapped = []
    for key, tensor in tensors.items():
        m = KEY.match(key)
        if m is None:
            unmapped.append(key.removeprefix(PREFIX))
            continue
        found.setdefault(m[2], {}).setdefault(int(m[1]), {})[m[3]] = tensor
    if not found:
        raise UserError(f"{where}: not an adapter of GPT-2 (modules such as "
                        f"{', '.join(sorted(unmapped)[:3])}); lora-repro reads transformer.h.N."
                        "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj")
    if unmapped:
        names = sorted({re.sub(r"\.(lora_\w+|weight|bias).*$", "", k) for k in unmapped})
        raise UserError(f"{where}: cannot map module(s) {', '.join(names[:5])}; lora-repro "
                        "reads attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj of each block")
    n_layer = 1 + max(i for layers in found.values() for i in layers)
    out = {}
    for module, layers in sorted(found.items()):
        missing = sorted(set(range(n_layer)) - set(layers))
        if missing:
            raise UserError(f"{where}: adapts {module} in some layers only (not in "
                            f"{missing[:5]}); lora-repro adapts a matrix in every layer")
        bad = [i for i, ab in layers.items() if set(ab) != {"A", "B"}]
        if bad:
            raise UserError(f"{where}: {module} of layer {bad[0]} lacks lora_A or lora_B")
        out[module] = {i: (layers[i]["A"], layers[i]["B"]) for i in range(n_layer)}
        a, b = out[module][0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (
                module == FUSED and b.shape[0] != 3 * a.shape[1]):
            raise UserError(f"{where}: {module} has lora_A {tuple(a.shape)}, lora_B "
                            f"{tuple(b.shape)}; "
                            "GPT-2 needs A (r, d_in), B (d_out, r), d_out = 3 d_in for c_attn")
    return out


def export_layout(targets: str, rank: int) -> dict[int, list[int]]:
    """The columns of B' each c_attn slice owns in `to_peft`'s export of `targets` at `rank`."""
    fused = [t.slice_index for t in TARGETS.values() if t.module == FUSED and t.letter in targets]
    return {s: list(range(j * rank, (j + 1) * rank)) for j, s in enumerate(fused)}


def block_layout(bs: list[torch.Tensor], hint: dict[int, list[int]] | None = None
                 ) -> dict[int, list[int]] | None:
    """The columns of B' (3 d, r') that each slice of c_attn owns, if every layer's B' is
    block-diagonal in one shared layout (each column nonzero in one slice only, every
    adapted slice owning the same number of columns); else None. `hint`, the layout of an
    export (`export_layout`), is taken where B' is zero outside it (e.g. an untrained B = 0)."""
    if hint and sum(map(len, hint.values())) == bs[0].shape[1]:
        d = bs[0].shape[0] // 3
        mask = torch.ones_like(bs[0], dtype=torch.bool)
        for s, cols in hint.items():
            mask[s * d:(s + 1) * d, cols] = False
        if all(not b[mask].any() for b in bs):
            return hint
    layouts = set()
    for b in bs:
        nonzero = b.unflatten(0, (3, -1)).ne(0).any(dim=1)  # (3, r'): slice s uses column j
        per_col = nonzero.sum(dim=0)
        if not bool((per_col == 1).all()):
            return None
        owner = nonzero.int().argmax(dim=0).tolist()
        layouts.add(tuple(owner))
    if len(layouts) != 1:
        return None
    owner = layouts.pop()
    cols = {s: [j for j, o in enumerate(owner) if o == s] for s in sorted(set(owner))}
    return cols if len({len(c) for c in cols.values()}) == 1 else None


def svd_factors(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of dW = b @ a (b: (d_out, r), a: (r, d_in)) from dW's thin SVD:
    returns (S^1/2 Vh (r, d_in), U S^1/2 (d_out, r)), singular values descending.

    By hand, not `analysis.linalg.svd_of_product` (the analysis package builds on this one):
    with a^T = Q R, dW = (b R^T) Q^T, and the SVD of the small (d_out, r) b R^T gives U, S and
    Vh = vh Q^T."""
    q, r = torch.linalg.qr(a.double().T)  # q (d_in, r)
    u, s, vh = torch.linalg.svd(b.double() @ r.T, full_matrices=False)
    root = s.sqrt()
    return (root[:, None] * (vh @ q.T)).to(a.dtype), (u * root).to(b.dtype)


def from_peft(tensors: dict[str, torch.Tensor], config: dict, where: str,
              hint: dict[int, list[int]] | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A peft GPT-2 LoRA adapter as lora-repro adapter tensors and metadata (the layout of
    `lora_repro.lora.adapter`), with metadata "structure": "per-matrix" or "svd" (see the
    module docstring); `hint`: see `block_layout`. Raises `UserError` for what cannot be
    represented exactly."""
    check_config(config, where)
    modules = parse_keys(tensors, where)
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    structure = "per-matrix"
    for module, layers in modules.items():
        if module != FUSED:
            letter = next(t.letter for t in TARGETS.values() if t.module == module)
            factors |= {(i, letter): (a, b, _scaling(config, i, module, a.shape[0]))
                        for i, (a, b) in layers.items()}
            continue
        d = layers[0][1].shape[0] // 3
        cols = block_layout([b for _, b in layers.values()], hint)
        structure = "per-matrix" if cols else "svd"
        for i, (a, b) in layers.items():
            scale = _scaling(config, i, module, a.shape[0])
            for s, letter in enumerate("qkv"):
                rows = slice(s * d, (s + 1) * d)
                if cols is None:
                    factors[(i, letter)] = (*svd_factors(scale * b[rows], a), 1.0)
                elif s in cols:
                    factors[(i, letter)] = (a[cols[s]], b[rows][:, cols[s]], scale)
    ranks = {f"h.{i}.{m}": a.shape[0] for (i, m), (a, _, _) in sorted(factors.items())}
    if len(set(ranks.values())) > 1:
        by_rank: dict[int, str] = {}
        for k, r in ranks.items():
            by_rank.setdefault(r, k)  # the first matrix of each rank
        shown = ", ".join(f"{k} has {r}" for r, k in sorted(by_rank.items()))
        raise UserError(f"{where}: matrices have different ranks ({shown}); a lora-repro "
                        "adapter has one rank")
    rank = next(iter(ranks.values()))
    letters = {m for _, m in factors}
    scaling = max(scale for *_, scale in factors.values())  # fold the others into B
    out = {}
    for (i, letter), (a, b, scale) in sorted(factors.items()):
        out[f"h.{i}.{letter}.lora_A"] = a.float().contiguous()
        out[f"h.{i}.{letter}.lora_B"] = (b.float() * (scale / scaling)).contiguous()
    return out, _meta(modules, letters, rank, scaling, config, structure)


def _meta(modules: dict, letters: set[str], rank: int, scaling: float, config: dict,
          structure: str) -> dict[str, str]:
    """The metadata `lora_repro.lora.adapter.read_adapter` returns, from the parsed modules."""
    n_layer = len(next(iter(modules.values())))
    # d_model: the input width of every module but the MLP's down-projection (its output)
    module, (a, b) = next((m, layers[0]) for m, layers in modules.items())
    n_embd = b.shape[0] if module == "mlp.c_proj" else a.shape[1]
    meta = {"format": FORMAT, "targets": parse_targets("".join(letters)),
            "rank": str(rank), "alpha": repr(scaling * rank),
            "dropout": str(float(config.get("lora_dropout", 0.0))),
            "base_model": str(config.get("base_model_name_or_path") or ""),
            "n_layer": str(n_layer), "n_embd": str(n_embd), "source": "peft",
            "structure": structure}
    inner = modules.get("mlp.c_fc") or modules.get("mlp.c_proj")
    if inner is not None:
        a, b = inner[0]
        meta["n_inner"] = str(b.shape[0] if "mlp.c_fc" in modules else a.shape[1])
    return meta
