"""Executors that run independent tasks (simulation chunks) and yield results as they finish.

The local default runs tasks in this process (``workers=1``) or in forked worker processes
(``workers>1``); a task is a picklable callable with its arguments. Results arrive in
completion order, so callers must not depend on order (the store writes each chunk at its
own offset).

Example:
    >>> list(run_tasks(abs, [(-1,), (2,)], workers=1))
    [(0, 1), (1, 2)]
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

__all__ = ["default_workers", "run_tasks"]

# Set in the parent before forking so workers inherit the (possibly unpicklable) task function.
_TASK: Callable[..., Any] | None = None


def default_workers() -> int:
    """Worker processes to use by default: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _call_inherited(args: tuple[Any, ...]) -> Any:
    assert _TASK is not None
    return _TASK(*args)


def _limit_threads() -> None:
    # One simulation process per core: keep numerical libraries from oversubscribing. The
    # variables reach libraries loaded later; threadpoolctl resizes those the fork inherited.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def run_tasks(
    fn: Callable[..., Any],
    args_list: Sequence[tuple[Any, ...]],
    workers: int = 1,
) -> Iterator[tuple[int, Any]]:
    """Run ``fn(*args)`` for every tuple in ``args_list``; yield ``(index, result)`` as each finishes.

    With ``workers > 1`` the tasks run in forked processes that inherit ``fn`` (so closures and
    user objects need not be picklable; their results must be). An exception in a task is
    re-raised here after the pending tasks are cancelled; finished results already yielded are
    the caller's to keep.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1 or len(args_list) <= 1:
        for index, args in enumerate(args_list):
            yield index, fn(*args)
        return
    global _TASK
    _TASK = fn
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_limit_threads) as pool:
        pending: dict[Future, int] = {}
        queue = list(enumerate(args_list))[::-1]
        # Keep a bounded number of tasks in flight so results stream back as they finish.
        try:
            while queue or pending:
                while queue and len(pending) < 2 * workers:
                    index, args = queue.pop()
                    pending[pool.submit(_call_inherited, args)] = index
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    yield index, future.result()
        finally:
            for future in pending:
                future.cancel()
