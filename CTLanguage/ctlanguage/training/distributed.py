"""torchrun / DistributedDataParallel helpers (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def env_world() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def setup(device_pref: str | None = None) -> tuple[int, int, torch.device]:
    """Initialise the process group when launched by torchrun; choose the device."""
    rank, world, local = env_world()
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_mean(value: float, device) -> float:
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
