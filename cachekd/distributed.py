"""Process-group setup and device choice shared by precompute and training (torchrun sets the environment)."""

from __future__ import annotations

import os

import torch

from cachekd.errors import CachekdError, ConfigKeysError


def setup() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the torchrun process group (NCCL on GPU, gloo on CPU) if there is one."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum `t` over processes in place (a no-op for one process)."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


DEVICE_FORMS = "auto, cpu, cuda, cuda:N (N a GPU index, e.g. cuda:0), mps"


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """`auto` → this process's GPU (cuda:LOCAL_RANK) when CUDA is present, else the CPU; refuses CUDA without a GPU
    and any string that is not a device, listing the forms it takes."""
    spec = str(spec).strip()
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigKeysError("{device} {spec!r} is not a device; use one of {forms}.", spec=spec,
                              forms=DEVICE_FORMS) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigKeysError("device {spec} was asked for but no CUDA GPU is available; use {device} cpu.",
                                  spec=spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CachekdError(f"device {spec} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                               f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigKeysError("device {spec} was asked for but MPS (Apple GPU) is not available; use {device} "
                                  "cpu.", spec=spec)
    elif device.type != "cpu":
        raise ConfigKeysError("{device} {spec!r} is not supported; use one of {forms}.", spec=spec, forms=DEVICE_FORMS)
    return device
