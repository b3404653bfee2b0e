"""The fast training path (on by default on CUDA): same math as the plain path, fewer launches.

At E2E's short sequences (~64 tokens, batch 8) a GPT-2 Medium step is bound by kernel
launches and Python, not by the GPU. The tricks, each one line of code:

1. `torch.compile` of the loss (forward + cross-entropy; AOTAutograd compiles the backward):
   fuses LayerNorm, GELU, residual adds, dropout and the LoRA scaling into few kernels.
2. CUDA graphs (`mode="reduce-overhead"`) replay the whole forward and backward with one
   launch each. Graphs need static shapes, so batches are padded to length buckets (every
   16 tokens up to 256: E2E's batches are 88% real tokens, 79% with buckets of 32) and the
   last, smaller batch gets empty rows (label -100, so the loss is unchanged).
   `warm_up` marks the length dimension symbolic, so one compile serves every bucket
   (torch's default compiles the first length statically, then again with a symbolic
   length). Inductor's matmul padding (`shape_padding`) is off: it decides per matmul size
   whether to pad, and guards the length to the range where its choice holds (on an H200
   that specialized `labels` to its first length: 2 graphs for qv, 3 for qkvo); our matmul
   dims are multiples of 8, and the vocabulary is padded by hand (5.). It then records
   one CUDA graph per bucket, all before the first step: no job stalls to compile or record
   mid-training (where it would also slow every job sharing the GPU). Only the length is symbolic:
   `dynamic=True` (every dim symbolic) was tried on an H200 and its qkvo jobs segfaulted
   while compiling.
3. cuDNN's SDPA backend is off: it pays 130-170 ms the first time it meets each sequence
   length; flash / memory-efficient attention have no such warm-up.
4. Fused AdamW and bf16 autocast live in the trainer; losses stay on the device between log
   steps (no host sync per step).
5. The LM head's vocabulary is padded to a multiple of `VOCAB_MULTIPLE` inside the loss
   (`trainer.lm_logits`; the logits are sliced back, same values): GPT-2's 50,257 rows put
   its forward and backward GEMMs on unaligned kernels, 16% of a qv step's kernel time at
   batch 8 and 21% with 10 jobs packed (bench/RESULTS.md, "Step profile", "Packed step").
6. Compilation is paid once per shape, not once per job: inductor's FX graph cache and
   AOTAutograd's cache live in a persistent directory (`COMPILE_CACHE`, or the
   `TORCHINDUCTOR_CACHE_DIR` you set), shared by a sweep's jobs and by later sweeps.
7. Attention stays as transformers gives it. Compiled on the H200 (torch 2.11, transformers
   5.17), it passes SDPA a mask tensor, so SDPA runs its memory-efficient kernel, not flash.
   An attention without the mask (`is_causal=True`, the same math for right-padded rows)
   was tried there and was slower: flash's backward took 2.2 ms of a 10-job packed step,
   the memory-efficient kernel's 1.4 (34.5 against 33.4 ms per step; bench/RESULTS.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lora_repro.data import bucket_length, collate
from lora_repro.data.encoding import IGNORE_INDEX

COMPILE_CACHE = Path("~/.cache/lora_repro/inductor").expanduser()
BUCKETS = (*range(16, 257, 16), 384, 512, 768, 1024)
VOCAB_MULTIPLE = 64  # the LM head's rows, padded (50,257 -> 50,304)


def length_buckets(max_length: int) -> list[int]:
    """Padded lengths the fast path uses: the fixed buckets below `max_length`, and it."""
    return [b for b in BUCKETS if b < max_length] + [max_length]


def static_batch(
    features: list[dict], pad_id: int, batch_size: int, buckets: list[int] | None
) -> dict[str, torch.Tensor]:
    """Collate to a static shape: rows padded up to `batch_size` with empty examples and
    length padded up to a bucket. Without buckets, the plain dynamic padding."""
    if buckets is None:
        return collate(features, pad_id)
    empty = {"input_ids": [pad_id], "labels": [IGNORE_INDEX]}
    features = features + [empty] * (batch_size - len(features))
    longest = max(len(f["input_ids"]) for f in features)
    return collate(features, pad_id, pad_to=bucket_length(longest, buckets))


def persistent_compile_cache() -> Path:
    """Point inductor's caches at a persistent directory (unless TORCHINDUCTOR_CACHE_DIR is
    set) and turn on the FX graph and AOTAutograd caches; call before the first compile.
    torch's own default is /tmp/torchinductor_<user>, which a reboot or tmp cleaner empties."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(COMPILE_CACHE))
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_loss(loss_fn, backend: str = "inductor", cuda_graphs: bool = True):
    """`loss_fn` compiled for training, with CUDA graphs on inductor (one per length, recorded
    on first use): call `step_begin()` every step. Tests pass another `backend`;
    bench.step_profile turns the graphs off to profile the same kernels one by one."""
    persistent_compile_cache()
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch._inductor.config.shape_padding = False  # its length guards recompile (see above)
    # One recorded graph per bucket is the design, not a shape leak: don't warn about it.
    torch._inductor.config.triton.cudagraph_dynamic_shape_warn_limit = None
    mode = "reduce-overhead" if backend == "inductor" and cuda_graphs else None
    return torch.compile(loss_fn, mode=mode, backend=backend)


def batch_shapes(lengths: list[int], batch_size: int, buckets: list[int]) -> list[tuple[int, int]]:
    """The (rows, padded length) shapes `static_batch` can give for examples of `lengths`:
    a batch is padded to the bucket of its longest example."""
    return sorted({(batch_size, bucket_length(n, buckets)) for n in lengths})


def warm_up(loss_fn, model: torch.nn.Module, shapes: list[tuple[int, int]], autocast,
            label_smoothing: float = 0.0) -> None:
    """Run `loss_fn` forward and backward twice on a dummy batch of each (rows, length)
    shape: the first call compiles (or loads from the cache) and warms CUDA-graph trees, the
    second records the graph. With several lengths, the length is marked symbolic, so one
    compile serves all. Afterwards training meets only recorded shapes. The RNG
    streams are restored and the gradients dropped, so training then runs exactly as it
    would without this."""
    device = next(model.parameters()).device
    symbolic = len({length for _, length in shapes}) > 1
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for rows, length in shapes:
            ids = torch.zeros((rows, length), dtype=torch.long, device=device)
            labels = ids.clone()  # one tensor passed twice would compile an aliasing graph
            if symbolic:
                for x in (ids, labels):
                    torch._dynamo.maybe_mark_dynamic(x, 1)
            for _ in range(2):
                step_begin()
                with autocast():
                    loss = loss_fn(model, ids, labels, label_smoothing)
                loss.sum().backward()  # a pack's loss is one per job (packed_trainer)
                # The gradients live in the graphs' memory, which the next replay reuses:
                # accumulating into them there would read overwritten memory.
                model.zero_grad(set_to_none=True)


def step_begin() -> None:
    """Tell CUDA-graph trees a new training step starts (outputs of the last may be reused)."""
    torch.compiler.cudagraph_mark_step_begin()
