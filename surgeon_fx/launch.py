"""The processes of one ``surgeon-fx compress`` run: the process group ``torchrun`` asks for, and who writes.

Reads: torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
Writes: nothing on disk; initialises (and at the end destroys) the default ``torch.distributed`` process
group when the environment asks for several processes and none is initialised yet.
Invariant: every rank takes rank 0's decisions (:func:`from_rank0` broadcasts them, errors included; an
error of any rank in :func:`on_every_rank` reaches every rank), and only rank 0 (:func:`is_main`) writes
files or prints; the other ranks compute the same model and write nothing.

A rank that fails while the others wait in a collective (the curvature sweep's all-reduce) cannot tell
them: under ``torchrun`` the launcher stops the other workers as soon as one exits with an error; a
launch without such a supervisor leaves them waiting until the group's timeout (:data:`TIMEOUT`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TypeVar

import torch

__all__ = [
    "TIMEOUT",
    "env_world",
    "rank_device",
    "backend_for",
    "process_group",
    "rank_and_world",
    "is_main",
    "from_rank0",
    "on_every_rank",
]

TIMEOUT = timedelta(minutes=60)
"""How long a rank waits in a collective: the others wait there while rank 0 evaluates and writes."""

T = TypeVar("T")


def env_world(environ=os.environ) -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` that a launcher such as ``torchrun`` set, ``(0, 0, 1)`` without.

    Raises:
        ValueError: ``WORLD_SIZE > 1`` without ``RANK``, ``MASTER_ADDR`` or ``MASTER_PORT``, or values that
            are not integers.
    """

    def integer(key: str, default: str) -> int:
        value = environ.get(key, default)
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"environment variable {key}={value!r} must be an integer (torchrun sets it)") from None

    world = integer("WORLD_SIZE", "1")
    if world <= 1:
        return 0, 0, 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun "
            "(torchrun --nproc-per-node N -m surgeon_fx.cli compress ...)"
        )
    rank = integer("RANK", "0")
    return rank, integer("LOCAL_RANK", str(rank)), world


def rank_device(device: str, local_rank: int, world: int) -> str:
    """The device this rank runs on: ``cuda`` becomes ``cuda:LOCAL_RANK`` when there are several ranks.

    Raises:
        ValueError: an explicit ``cuda:N`` with several ranks (they would all share one GPU).
    """
    if world <= 1 or torch.device(device).type != "cuda":
        return device
    if torch.device(device).index is not None:
        raise ValueError(
            f"--device {device} with {world} processes would put every rank on one GPU; pass --device cuda "
            "(each rank then runs on cuda:LOCAL_RANK)"
        )
    return f"cuda:{local_rank}"


def backend_for(device: str) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device: str, environ=os.environ) -> Iterator[str]:
    """Initialise the default process group the environment asks for; yield this rank's device.

    Nothing happens in a single process or when a group is already initialised (the caller's); a group
    created here is destroyed on the way out, also after an error.

    Args:
        device: the ``--device`` option (``cpu``, ``cuda``, ``cuda:0``, ...).
        environ: the environment to read (``os.environ``).

    Yields:
        The device this rank runs on (``cuda:LOCAL_RANK`` for ``cuda`` under several ranks).

    Raises:
        ValueError: an inconsistent environment or device (see :func:`env_world`, :func:`rank_device`), or
            several processes without ``torch.distributed``.
    """
    import torch.distributed as dist

    rank, local_rank, world = env_world(environ)
    device = rank_device(device, local_rank, world)
    if world > 1 and not dist.is_available():
        raise ValueError(f"WORLD_SIZE={world} but this torch build has no torch.distributed; run one process")
    if world <= 1 or dist.is_initialized():
        yield device
        return
    device_id = None
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(device)
        device_id = torch.device(device)
    dist.init_process_group(backend_for(device), rank=rank, world_size=world, timeout=TIMEOUT, device_id=device_id)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised default group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on the rank that writes files and prints (rank 0, or the only process)."""
    return rank_and_world()[0] == 0


def from_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank; if it raised, every rank raises.

    Without a process group this is ``fn()``. The result must be picklable; an exception that is not
    travels as a ``RuntimeError`` with its message.
    """
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world == 1:
        return fn()
    box: list = [None]
    if rank == 0:
        try:
            box[0] = (True, fn())
        except Exception as e:
            box[0] = (False, _shippable(e))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _shippable(e: Exception) -> Exception:
    try:
        pickle.dumps(e)
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def on_every_rank(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank, then wait for all: if any rank raised, every rank raises.

    A rank that failed raises its own exception; the others raise the first failing rank's, its message
    prefixed with ``rank N:`` (a ``RuntimeError`` when it cannot be pickled). Without a process group this
    is ``fn()``.
    """
    import torch.distributed as dist

    world = rank_and_world()[1]
    if world == 1:
        return fn()
    error = None
    try:
        result = fn()
    except Exception as e:
        error = e
    errors: list = [None] * world
    dist.all_gather_object(errors, None if error is None else _shippable(error))
    if error is not None:
        raise error
    failed = next((r for r, e in enumerate(errors) if e is not None), None)
    if failed is None:
        return result
    e = errors[failed]
    try:
        named = type(e)(f"rank {failed}: {e}")
    except Exception:
        named = e
    raise named
