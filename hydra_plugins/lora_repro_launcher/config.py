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
    # Jobs at once on each GPU (each job one process). auto: from the GPUs' memory, one job
    # per 12 GiB, 1 to 10 (`launcher.auto_per_gpu`): 10 on an H200, 6 on an 80 GB GPU, 2 on
    # a 24 GB one; 4 if nvidia-smi cannot tell. On an H200, without MPS the tokens/s of all
    # jobs together stopped growing at 2; with MPS, 10 at once beat 4 by 19% (85k against
    # 71k real tokens/s; bench/RESULTS.md, "Sweep with and without MPS"). A GPT-2 Medium job
    # at batch 8 peaks at 2.5 GiB.
    per_gpu: Any = "auto"
    # Run the jobs under an MPS server of the sweep's own (nvidia-cuda-mps-control, from the
    # driver), so the kernels of jobs sharing a GPU run at the same time instead of taking
    # turns. auto: on GPUs when the program is on PATH and no MPS server is set up already
    # (CUDA_MPS_PIPE_DIRECTORY); true: required; false: off. On an H200 it added 26% to the
    # tokens/s of 10 jobs at once and 12% to 4 (bench/RESULTS.md, "Sweep with and without
    # MPS"). The price: under MPS a GPU fault (an illegal memory access, not an OOM or a
    # Python error) in one job can end every job on that GPU; rerunning the command resumes.
    mps: Any = "auto"
    # Train up to this many jobs of the sweep as one (lora_repro.packed_trainer): jobs that
    # differ only in rank and targets share one process, one frozen base and one batch. On
    # an H200 the mission sweep's 10 jobs as one pack stepped in 34.8-36.2 ms, 1.5x the
    # tokens/s of 10 processes under MPS: 16-19 min projected for the paper sweep against 25
    # (bench/RESULTS.md, "Sweep ..., packs of 10"). A pack takes one of the per_gpu slots.
    # Results equal a job alone's up to float rounding and dropout draws, not bit for bit:
    # so 1 (off) by default.
    pack: int = 1
    # Jobs at once without GPUs. 1 runs them one after another in this process, as
    # Hydra's basic launcher does.
    workers: int = 1


ConfigStore.instance().store(
    group="hydra/launcher", name="parallel", node=ParallelLauncherConf, provider="lora_repro"
)
