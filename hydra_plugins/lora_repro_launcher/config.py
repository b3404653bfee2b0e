"""`hydra/launcher=parallel`: the launcher's options, registered with Hydra's ConfigStore."""


from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class ParallelLauncherConf:
    _target_: str = "hydra_plugins.lora_repro_launcher.launcher.ParallelLauncher"
    # GPUs to use, as CUDA_VISIBLE_DEVICES entries ([0, 1]); null: every visible GPU;
    # []: none (CPU). Env LORA_REPRO_GPUS="0,1" ("" for none) sets it too.
    gpus: Any = None
    # Jobs at once on each GPU (each job one process). On an H200 the tokens/s of all jobs
    # together stopped growing at 2 (bench/RESULTS.md, "Sweep"); 4 also overlaps one job's
    # warm-up with the others' training.
    per_gpu: int = 4
    # Run the jobs under an MPS server of the sweep's own (nvidia-cuda-mps-control, from the
    # driver), so the kernels of jobs sharing a GPU may run at the same time instead of taking
    # turns. Off by default: not yet measured with this toolkit's jobs.
    mps: bool = False
    # Jobs at once without GPUs. 1 runs them one after another in this process, as
    # Hydra's basic launcher does.
    workers: int = 1


ConfigStore.instance().store(
    group="hydra/launcher", name="parallel", node=ParallelLauncherConf, provider="lora_repro"
)
