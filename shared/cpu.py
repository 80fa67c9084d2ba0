"""Idle cores that a prefork pool process may borrow for one large batch.

Each pool process of a prefork worker gets its share of the node's cores as threads (one per
process on a 2-core node with ``-c 2``). A lone large batch (``sentiment.analyze_batch``) would
then run on one core while the cores of idle pool processes wait. ``borrowable()`` counts the
cores this process may use on top of its own for the call it is about to make: the CPUs it may
run on, minus its own share and the share of every sibling (another child of its parent: another
pool process) that the kernel shows running right now (state ``R`` in ``/proc/PID/stat``). A
sibling that waits for work is asleep; under load the siblings run and nothing is borrowed.

Nothing is borrowed until ``enable`` is called (the worker does it in each prefork pool process
when ``MODELWORKERS_BORROW_IDLE_CORES`` is on), nor where ``/proc`` cannot be read.
"""

from __future__ import annotations

import os

_threads = 0  # this process's thread budget once enabled; 0: never borrow


def enable(threads: int) -> None:
    """Let this process borrow idle cores; ``threads``: its own share (and each sibling's)."""
    global _threads
    _threads = max(0, threads)


def disable() -> None:
    enable(0)


def running_siblings() -> int | None:
    """How many other children of this process's parent are running now; None: unknown."""
    parent, me = os.getppid(), os.getpid()
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as listing:
            pids = [int(pid) for pid in listing.read().split()]
    except (OSError, ValueError):
        return None
    running = 0
    for pid in pids:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as stat:
                # "pid (comm) state ...": comm may hold spaces and parentheses
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # it just ended
        running += state == "R"
    return running


def borrowable() -> int:
    """Cores this process may use for one call beyond its own share (0 when not enabled)."""
    if _threads <= 0:
        return 0
    running = running_siblings()
    if running is None:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(0, cores - _threads * (1 + running))
