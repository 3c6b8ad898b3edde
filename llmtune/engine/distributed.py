"""Process-group set-up: one process on CPU or GPU, or many under torchrun / the deepspeed launcher."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_distributed(backend: str = "auto", local_rank: int | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed. Without a launcher, act as rank 0 of 1."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank or 0))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if local_rank is not None:
        os.environ["LOCAL_RANK"] = str(local_rank)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from llmtune.engine import import_deepspeed

    import_deepspeed()
    import deepspeed.ops

    if not cuda and os.environ.get("LLMTUNE_DS_SHM") != "1":
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU *inference* when it sets up
        # communication (~40 s on a fresh machine). Training collectives go through gloo, so skip it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    lrank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and (not cuda or not torch.distributed.is_nccl_available()):
        from llmtune.errors import RecipeError

        raise RecipeError(
            "distributed.backend nccl needs NVIDIA GPUs and a torch built with NCCL; this machine has "
            + ("no CUDA device" if not cuda else "a torch without NCCL"),
            hint="use distributed.backend: auto (nccl on GPUs, gloo on CPU) or gloo",
        )
    if cuda:
        torch.cuda.set_device(lrank)
        device = torch.device("cuda", lrank)
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, dist_init_required=True)
    return DistInfo(rank=rank, world_size=world, local_rank=lrank, device=device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def sums_over_processes(parts: Sequence[float | torch.Tensor], device: torch.device) -> list[float]:
    """Each of `parts` (numbers or 0-d tensors) summed over every process, in float64, in one all-reduce."""
    local = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in parts]).to(device)
    return [float(x) for x in all_reduce_sum(local).cpu().tolist()]


def moments_over_processes(x: torch.Tensor, device: torch.device) -> tuple[float, float, float]:
    """(count, mean, population variance) of the values of x on every process together."""
    n, s, sq = sums_over_processes([x.numel(), x.double().sum(), (x.double() ** 2).sum()], device)
    mean = s / max(n, 1.0)
    return n, mean, max(sq / max(n, 1.0) - mean**2, 0.0)
