"""torch.distributed glue: one code path for 1 or P processes.

Launched by ``torchrun --nproc-per-node=P -m optamal …`` (``WORLD_SIZE`` > 1), the
process group is initialised with gloo on CPU and nccl on CUDA. Meta-batch
trajectories and evaluation cells are split across ranks (member b goes to rank
b mod P), meta-gradients are summed with all-reduce, and rank 0 alone writes the run
folder. Without torchrun, world size is 1 and every helper here is a no-op.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch


def world() -> tuple[int, int]:
    """(rank, world size), initialising the process group under torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and os.environ.get("OPTAMAL_DIST_BACKEND", "") != "gloo"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    return world()[0] == 0


def all_reduce_grads(module: torch.nn.Module) -> None:
    """Sum gradients over ranks (each rank already scaled its loss by 1/global batch)."""
    rank, size = world()
    if size == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    off = 0
    for p, g in zip(module.parameters(), grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(p).clone()
        off += n


def all_reduce_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum a list of same-device tensors over ranks (returns new tensors)."""
    rank, size = world()
    if size == 1 or not tensors:
        return tensors
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors]).clone()
    dist.all_reduce(flat)
    out, off = [], 0
    for t in tensors:
        out.append(flat[off:off + t.numel()].view_as(t))
        off += t.numel()
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    rank, size = world()
    if size == 1:
        return values
    t = all_reduce_tensors([torch.tensor(values, dtype=torch.float64)])[0]
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-item list without torchrun)."""
    rank, size = world()
    if size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def shutdown(wait: bool = True) -> None:
    """Destroy the process group if one was made (under torchrun). Left to interpreter exit,
    gloo's threads can be torn down while still joinable, which aborts the rank
    ("terminate called without an active exception", exit -6) after its work is done.
    ``wait=False`` after an error: a barrier could pair with another rank's collective."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if wait:   # after a normal finish: no rank leaves while another still talks to it
                dist.barrier()
        finally:
            dist.destroy_process_group()


def barrier() -> None:
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()
