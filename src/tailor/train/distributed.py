"""Data-parallel training through accelerate: the same loop on one process or many (`accelerate launch`).

Launched with `accelerate launch --multi_gpu --num_processes N -m tailor.cli.app train` — on GPUs (NCCL) and on CPUs
alike (gloo): `--multi_gpu` only selects accelerate's torchrun launcher, while `--cpu` would select its simple
launcher, which starts one process unless mpirun is installed; `torchrun --nproc_per_node N -m tailor.cli.app train`
works too. Every process runs the same loop: the model is wrapped for gradient sync (DDP; FSDP or DeepSpeed when
the accelerate config names them), each process takes its share of every optimizer step's micro-batches, and only
the main process writes files. Run without a launcher, the Accelerator is a single process and the wrappers are no-ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]


class LossModule(torch.nn.Module):
    """The model and its objective (loop.Objective) in one forward, and one module holding every trainable
    parameter (an objective may own some, e.g. a reward head).

    A data-parallel wrapper (DDP, FSDP) only syncs gradients of what ran inside its own forward; the loss calls the
    decoder and the output projection separately (label positions only), so both must run inside this forward.
    """

    def __init__(self, model: torch.nn.Module, objective: torch.nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective
        # FSDP's auto-wrap policy looks for the transformer block classes here
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.objective(self.model, batch)


def make_accelerator(report_to: Sequence[str], logging_dir: Path):
    from accelerate import Accelerator

    # precision is ours to manage (bf16 frozen weights, fp32 trainable ones), so accelerate adds no autocast
    return Accelerator(cpu=_cpu_only(), mixed_precision="no", log_with=list(report_to) or None,
                       project_dir=str(logging_dir))


def _cpu_only() -> bool:
    # without cpu=True accelerate ignores torchrun's RANK/WORLD_SIZE on a machine without GPUs (no gloo group)
    return not torch.cuda.is_available()


def process_layout() -> tuple[int, int]:
    """(processes, this process's rank): (1, 0) outside a launcher."""
    from accelerate import PartialState

    state = PartialState(cpu=_cpu_only())
    return state.num_processes, state.process_index


def is_main_process() -> bool:
    """True outside `accelerate launch`, and on rank 0 inside it: the one process that writes run files."""
    from accelerate import PartialState

    return PartialState(cpu=_cpu_only()).is_main_process
