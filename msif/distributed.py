"""Running one msif stage across processes and machines with PyTorch's own runtime, launched by `torchrun`.

    torchrun --nproc-per-node 2 -m msif influence dataset=mnist            # 2 processes on this machine (gloo)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint host:29500 -m msif influence ...   # 2 machines

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; msif then joins the process group (gloo on CPU, NCCL on
CUDA devices) and shards the work: every Hessian-vector product sums over its share of the Hessian sample and
all-reduces (so the solves run identically on every process), and each process scores its share of the pretraining
examples. Process 0 runs any missing upstream stage first, writes the outputs and prints; the others stay quiet.
Without torchrun (WORLD_SIZE unset or 1) nothing here does anything. Across machines, `output_root` must be on a
file system every machine sees (the processes read the same checkpoints and write parts of the same run folder).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def launched() -> bool:
    """True when this process was started by torchrun with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """This process's device: CUDA devices are one per process on a machine (cuda:LOCAL_RANK)."""
    if launched() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init(device: torch.device) -> None:
    """Join the torchrun job's process group once (gloo for CPU tensors, NCCL for CUDA)."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the processes, in place (every process gets the same result); a no-op on one process."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if active():
        dist.barrier()


def gather_to_main(obj):
    """Every process's `obj`, in rank order, on process 0 (None elsewhere); [obj] on one process."""
    if not active():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj):
    """Process 0's `obj` on every process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_first():
    """Process 0 runs the block first (e.g. training a missing upstream stage); the others wait, then run it (and
    find the results on disk)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def shard(items: list, of: int | None = None) -> list:
    """This process's share of `items`: every world_size-th one, starting at its rank."""
    return items[rank() :: world_size()] if of is None else items[rank() :: of]
