"""How many CPU threads torch uses in this process, set once where a command starts (``--threads``).

On a machine whose cores are busy with other jobs, torch's default (one thread per core) makes its threads
wait on each other: a run measured 36.4 s with the default and 4.6 s with one thread on a loaded 2-core machine.
"""
from __future__ import annotations

import logging

import torch

from . import limits

log = logging.getLogger(__name__)


def use_threads(n) -> int:
    """Run torch's CPU operators on ``n`` threads (checked by :func:`robaudit.limits.threads`), and its inter-op
    pool too while this process has not used it yet (torch fixes that pool at its first parallel work)."""
    count = limits.threads(n)
    torch.set_num_threads(count)
    if torch.get_num_interop_threads() != count:
        try:
            torch.set_num_interop_threads(count)
        except RuntimeError:  # the pool exists already; its size matters little next to the operators' threads
            log.debug("torch's inter-op threads are already fixed for this process: left at %d",
                      torch.get_num_interop_threads())
    return count
