"""torch.distributed helpers: every heavy command runs unchanged under ``torchrun``; plain runs stay single-process.

``torchrun --nproc_per_node M -m gradconflict gram ...`` sets RANK/WORLD_SIZE/MASTER_ADDR; ``init_from_env``
then starts a process group (NCCL when CUDA is available, gloo otherwise) with a timeout, so a rank that
fails makes the others fail instead of hanging. Without those variables nothing is initialised.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Collection, Hashable, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "shutdown", "barrier", "wait_for_all", "is_distributed", "rank", "world_size", "is_main",
           "all_reduce_sum", "all_reduce_min", "agreed", "shard", "local_device"]

def _seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable ``name``; a clear error for anything else."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name}={text!r} must be a positive number of seconds, e.g. {name}={int(default)}")
    return value


DEFAULT_TIMEOUT_S = 600.0  # GRADCONFLICT_DIST_TIMEOUT: every collective of a command
# waits that are long by design (the other ranks wait while rank 0 trains): torchrun ends them if rank 0 fails
WAIT_TIMEOUT_S = 7 * 24 * 3600.0  # GRADCONFLICT_DIST_WAIT
_wait_group: Optional[object] = None


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 writes files and prints summaries."""
    return rank() == 0


def init_from_env(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> bool:
    """Initialise the default process group from torchrun's environment; returns True when distributed. The
    timeout of its collectives: ``timeout_s``, else ``GRADCONFLICT_DIST_TIMEOUT`` (seconds, default 600)."""
    if not dist.is_available() or "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if timeout_s is None:
        timeout_s = _seconds("GRADCONFLICT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)
    if not dist.is_initialized():
        if backend is None:  # the command's --device decides where it is given (see cli.main)
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return is_distributed()


def local_device(requested: str) -> torch.device:
    """``cuda`` becomes this rank's GPU (``cuda:LOCAL_RANK``) under torchrun; a numbered GPU there is refused (every
    rank would compute on that one GPU while NCCL talks through its own)."""
    device = torch.device(requested)
    if device.type == "cuda" and is_distributed():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index is not None and device.index != local:
            raise ValueError(f"--device {requested} under torchrun would put every rank on GPU {device.index}; pass "
                             "--device cuda (each rank takes its own GPU, cuda:LOCAL_RANK), and choose the GPUs with "
                             "CUDA_VISIBLE_DEVICES")
        return torch.device("cuda", local)
    return device


def _backend_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Sum of ``x`` over all ranks (returns ``x`` unchanged when not distributed); keeps x's device and dtype.
    ``inplace``: a contiguous ``x`` on the backend's device is summed in its own memory (no copy: the engine's
    per-layer K x P buffers, which nothing reads before the sum); otherwise ``x`` is left as it was."""
    if not is_distributed():
        return x
    dev = _backend_device()
    y = x.detach().to(dev).contiguous()
    if y.data_ptr() == x.data_ptr() and not inplace:
        y = y.clone()  # .to / .contiguous returned x's own memory: do not sum into the caller's tensor
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y.to(x.device)


def agreed(items: Sequence[Hashable], held: Collection[Hashable]) -> set:
    """The ``items`` that any rank holds (``held``; in practice rank 0, which alone reads the disk, while the others
    pass an empty set), the same set on every rank: a rank without rank 0's disk must skip exactly the work rank 0
    skips, or the collectives of the two ranks stop matching."""
    mask = all_reduce_sum(torch.tensor([1.0 if i in held else 0.0 for i in items], dtype=torch.float64))
    return {i for i, m in zip(items, mask.tolist()) if m > 0}


def all_reduce_min(value: int) -> int:
    """The smallest of an integer over all ranks (``value`` itself when not distributed): a setting every rank
    must share, such as a memory budget that decides how many collective calls follow."""
    if not is_distributed():
        return value
    y = torch.tensor([value], dtype=torch.int64, device=_backend_device())
    dist.all_reduce(y, op=dist.ReduceOp.MIN)
    return int(y.item())


def shard(n: int) -> torch.Tensor:
    """Indices ``rank, rank + world, ...`` of ``range(n)``: this rank's share of a batch drawn identically on all ranks."""
    return torch.arange(rank(), n, world_size())


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def wait_for_all() -> None:
    """A barrier for waits that may outlast ``GRADCONFLICT_DIST_TIMEOUT`` by design, such as the other ranks
    waiting while rank 0 trains: it runs on a gloo group whose timeout is ``GRADCONFLICT_DIST_WAIT`` (seconds,
    default a week; torchrun still ends every rank at once if one fails). No-op when not distributed."""
    global _wait_group
    if not is_distributed():
        return
    if _wait_group is None:
        _wait_group = dist.new_group(backend="gloo",
                                     timeout=timedelta(seconds=_seconds("GRADCONFLICT_DIST_WAIT", WAIT_TIMEOUT_S)))
    dist.barrier(group=_wait_group)


def shutdown() -> None:
    """Wait for every rank, then destroy the process group (a rank that exits with it alive can abort)."""
    global _wait_group
    if dist.is_available() and dist.is_initialized():
        wait_for_all()  # ranks may finish far apart (e.g. rank 0 still writing figures)
        dist.destroy_process_group()
        _wait_group = None
