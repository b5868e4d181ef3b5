"""``torch.distributed`` under ``torchrun``: which process this is, and the sums the processes share.

robaudit never starts processes itself: ``torchrun`` does (one machine or several, with its own
rendezvous flags), and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``. Without them everything here is
the single-process identity, so the rest of the code calls these functions unconditionally.
"""
from __future__ import annotations

import contextlib
import gc
import os
from typing import Any, Callable, Iterator

import torch
import torch.distributed as tdist

from .errors import RobauditError


class PeerError(RobauditError):
    """Another process of the group failed: rank 0 says why in one line, the others stay quiet."""

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group is up (after :func:`init`)."""
    return tdist.is_available() and tdist.is_initialized()


def init(device: torch.device | None = None) -> None:
    """Join ``torchrun``'s process group once: NCCL for CUDA devices, gloo on CPU. A no-op in one process."""
    if not launched() or active():
        return
    if not tdist.is_available():
        raise RobauditError("this torch build has no torch.distributed: run in one process (without torchrun)")
    cuda = device is not None and device.type == "cuda"
    if cuda:  # NCCL binds each process to its own GPU: set it before the group forms
        torch.cuda.set_device(local_device(device))
    tdist.init_process_group(backend="nccl" if cuda else "gloo")


def rank() -> int:
    """This process's rank: from the group once it is up, from ``torchrun``'s ``RANK`` before that."""
    if active():
        return tdist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes files and reports."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` under torchrun for a CUDA device, else ``device``."""
    if device.type == "cuda" and launched() and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all processes, in place; ``t`` itself in one process."""
    if active() and world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if active() and world_size() > 1:
        tdist.barrier()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, e.g. before reading host copies made with ``non_blocking``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def was_shared(error: BaseException) -> bool:
    """Whether ``error`` already went through :func:`exchange`, so that rank 0 reports it."""
    return bool(getattr(error, "_robaudit_shared", False))


def _summary(error: BaseException | None) -> tuple[bool, str, str] | None:
    if error is None:
        return None
    text = str(error).strip()
    return isinstance(error, RobauditError), type(error).__name__, text.splitlines()[0][:300] if text else ""


def exchange(payload: Any, error: BaseException | None = None) -> list[Any]:
    """Every process's ``payload`` (one ``all_gather_object``), after checking that none of them failed.

    ``error`` is what this process raised before this point. If any process failed, every process raises:
    the failing one its own error, rank 0 a :class:`PeerError` naming the first failing rank, the others a
    quiet :class:`PeerError`. So an error on any rank stops the whole group instead of leaving it waiting.
    """
    if world_size() == 1:
        if error is not None:
            raise error
        return [payload]
    gathered = all_gather_objects((_summary(error), payload))
    failed = [(r, s) for r, (s, _) in enumerate(gathered) if s is not None]
    if error is not None:
        error._robaudit_shared = True  # type: ignore[attr-defined]
        raise error
    if failed:
        r, (user, kind, text) = failed[0]
        where = f"process {r} of {world_size()}"
        message = f"{text} ({where})" if user else f"unexpected {kind} in {where}: {text} (rerun with --debug for the traceback)"
        raise PeerError(message, exit_code=2 if user else 1)
    return [p for _, p in gathered]


@contextlib.contextmanager
def together() -> Iterator[None]:
    """A block that every process runs up to one shared check: if it raised anywhere, it raises everywhere
    (see :func:`exchange`). Without torchrun, just the block."""
    error = None
    try:
        yield
    except Exception as e:  # re-raised by exchange, on this rank and (as PeerError) on the others
        error = e
    exchange(None, error)


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every process's ``obj`` on rank 0 (in rank order), ``None`` on the others; ``[obj]`` in one process."""
    if world_size() == 1:
        return [obj]
    out: list | None = [None] * world_size() if is_main() else None
    tdist.gather_object(obj, out, dst=0)
    return out


def shutdown(*, failed: bool = False) -> None:
    """Leave the process group at the end of a command, so that the processes exit cleanly.

    After success all processes meet first: one that tears its connections down while another still
    uses them can abort the other (gloo). After a failure in this process there is no meeting (another
    process may be inside a collective that will never complete): the connections close, and the others
    fail at once instead of waiting for a timeout.
    """
    if active():
        # objects in reference cycles that still hold the group's tensors would otherwise be freed while the
        # interpreter exits, which can abort the process (gloo; seen 3 times in 20 two-process runs, not since)
        gc.collect()
        if not failed:
            barrier()
        tdist.destroy_process_group()


class GroupBroken(RobauditError):
    """The meeting at the end of a command broke: another process of the job failed first (its own message says
    why)."""

    exit_code = 1


@contextlib.contextmanager
def lifetime(*, finished: Callable[[BaseException], bool] = lambda error: False) -> Iterator[None]:
    """One command's life in ``torchrun``'s process group, which the stages join when they need it: whatever
    joined leaves at the end of the block, after a meeting when the block finished (without an exception, or
    with one that ``finished`` accepts, e.g. the exit of a command that ran to its end), at once after a failure
    (see :func:`shutdown`). A meeting that breaks although this process finished raises :class:`GroupBroken`.
    Without torchrun, just the block."""
    failed = True
    try:
        yield
        failed = False
    except BaseException as e:
        failed = not finished(e)
        raise
    finally:
        if launched():
            _leave(failed=failed)


def _leave(*, failed: bool) -> None:
    try:
        shutdown(failed=failed)
    except Exception as e:  # the group broke while meeting at the end: another process failed
        if failed:
            raise
        raise GroupBroken(f"another process of the job failed before the end ({type(e).__name__}); its own "
                          "message says why") from e


def reported_by_main(error: BaseException) -> bool:
    """Whether rank 0 reports ``error`` for this process (it went through :func:`exchange`), so that this
    process, another than rank 0, says nothing of it."""
    return not is_main() and (isinstance(error, PeerError) or was_shared(error))


def process_tag() -> str:
    """`` (process R)`` in a process of a torchrun job other than rank 0, for its one-line messages; empty
    otherwise."""
    return "" if is_main() else f" (process {rank()})"


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``t`` replaced, in place, by the process ``src``'s tensor; ``t`` itself in one process."""
    if active() and world_size() > 1:
        tdist.broadcast(t, src=src)
    return t


def all_gather_objects(obj) -> list:
    """Every process's ``obj`` (picklable, small), in rank order, on every process; ``[obj]`` in one process."""
    if not (active() and world_size() > 1):
        return [obj]
    out: list = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def global_sums(*local: torch.Tensor) -> list[torch.Tensor]:
    """Each scalar in ``local`` summed over the processes (one all-reduce for all of them).

    The value is the global sum, the same bits on every process; the gradient flows into this
    process's own term only, so a loss built from these sums differentiates to this process's share
    of the gradient (DDP adds the shares). The identity in one process.
    """
    if not (active() and world_size() > 1):
        return list(local)
    dtype = local[0].dtype
    total = all_reduce_sum(torch.stack([t.detach().to(dtype) for t in local]))
    return [total[i].to(t.dtype) + (t - t.detach()) for i, t in enumerate(local)]


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block in rank 0 first, then in the other processes (a download or a cache fill happens once)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
