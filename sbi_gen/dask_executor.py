"""Run independent tasks (simulation chunks) on a Dask cluster and yield results as they finish.

The Dask counterpart of :mod:`sbi_gen.parallel`: same contract (``(index, result)`` pairs in
completion order), for a cluster given by a scheduler address (``tcp://host:8786``), an existing
``distributed.Client``, or a ``LocalCluster`` started here for the duration of a run. Dask is
optional: it is imported only when this module is used, and a missing install is reported as
one line naming ``pip install sbi_gen[dask]``.

How results travel, and why: a task returns its result to the client, and the client alone
writes to disk. Workers on a real cluster may not share the client's file system (a scratch
disk per node, a laptop driving a remote cluster), so nothing here assumes a shared path. It
also makes retries harmless: tasks are pure functions of their arguments (a simulation chunk
carries its own random stream), so when a worker dies and Dask reruns its tasks elsewhere, or
recomputes a result lost with it, the rerun produces the same bytes and nothing is written
twice or half. The cost is that every result crosses the network once; for simulation chunks
those are the already-compressed bytes that the client would write anyway.

The task function is pickled once (with cloudpickle, so lambdas and closures work) and each
worker process unpickles it once; at most a bounded window of tasks is in flight, which keeps
results from piling up in worker memory when the client is slower than the cluster.

Example:
    >>> from sbi_gen.dask_executor import dask_client, run_tasks_dask  # doctest: +SKIP
    >>> with dask_client(local_workers=2) as client:  # doctest: +SKIP
    ...     sorted(run_tasks_dask(abs, [(-1,), (2,)], client))
    [(0, 1), (1, 2)]
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["DaskError", "dask_client", "require_distributed", "run_tasks_dask"]

_INSTALL_HINT = "pip install sbi_gen[dask]"
# Tasks in flight per worker thread: enough to keep every thread busy while results travel.
_IN_FLIGHT_PER_THREAD = 2
_MIN_IN_FLIGHT = 4
# The cluster may grow or shrink during a run (adaptive scaling, lost jobs): recount its threads this often.
_RECOUNT_SECONDS = 2.0


class DaskError(RuntimeError):
    """Dask is missing, the scheduler cannot be reached, or the cluster cannot run a task; one line."""


def require_distributed() -> Any:
    """Import and return ``distributed``, or raise :class:`DaskError` saying how to install it.

    Example:
        >>> require_distributed().__name__  # doctest: +SKIP
        'distributed'
    """
    try:
        import distributed
    except ImportError as error:
        raise DaskError(f"running on a Dask cluster needs dask[distributed] ({error}): {_INSTALL_HINT}") from None
    return distributed


@contextlib.contextmanager
def dask_client(
    scheduler: Any = None,
    local_workers: int | None = None,
    connect_timeout: float = 10.0,
) -> Iterator[Any]:
    """A ``distributed.Client`` for one run; what this opens, it closes.

    Arguments:
        scheduler: ``None`` (start a ``LocalCluster``), a scheduler address such as
            ``"tcp://host:8786"``, or a ``distributed.Client`` (used as is and left open).
        local_workers: Worker processes of the ``LocalCluster`` (one thread each); ``None``
            gives one per core this process may use.
        connect_timeout: Seconds to wait for the scheduler at an address before giving up.

    Raises:
        DaskError: Dask is not installed, or the scheduler did not answer in time.

    Example:
        >>> with dask_client(local_workers=1) as client:  # doctest: +SKIP
        ...     client.submit(abs, -3).result()
        3
    """
    distributed = require_distributed()
    if isinstance(scheduler, distributed.Client):
        yield scheduler
        return
    if scheduler is not None:
        if not isinstance(scheduler, str) or not scheduler.strip():
            raise DaskError(f"a Dask scheduler is an address such as tcp://host:8786 or a distributed.Client, got {scheduler!r}")
        # Checked first: a malformed address or unknown host then fails at once, in plain words.
        try:
            distributed.comm.resolve_address(scheduler)
        except Exception as error:
            raise DaskError(f"bad Dask scheduler address {scheduler!r}: {_first_line(error)}") from None
        try:
            # set_as_default=False: a run must not change which cluster the caller's own dask code uses.
            client = distributed.Client(scheduler, timeout=connect_timeout, set_as_default=False)
        except Exception as error:  # refused or timed out
            raise DaskError(
                f"cannot reach the Dask scheduler at {scheduler} within {connect_timeout:g} s "
                f"({_first_line(error)}); is it running, and is the address right?"
            ) from None
        with contextlib.closing(client):
            yield client
        return
    from sbi_gen.parallel import default_workers

    n_workers = default_workers() if local_workers is None else int(local_workers)
    if n_workers < 1:
        raise DaskError(f"a local Dask cluster needs at least one worker, got {n_workers}")
    with _environment_restored():
        cluster = _start_local_cluster(distributed, n_workers)
        try:
            with distributed.Client(cluster, set_as_default=False) as client:
                yield client
        finally:
            cluster.close()


def _start_local_cluster(distributed: Any, n_workers: int) -> Any:
    import dask

    # Dask sets MALLOC_TRIM_THRESHOLD_ in its workers to return memory to the system sooner;
    # it also switches off glibc's adaptive mmap threshold, so every large numpy temporary is
    # mapped and unmapped again: the cosmology simulator ran 1.4-2.5x slower with it.
    config = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    try:
        with dask.config.set(config):
            # One thread per process: simulators hold the GIL, and global random state stays per process.
            return distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
    except Exception as error:
        raise DaskError(
            f"could not start a local Dask cluster ({_first_line(error)}); worker processes import the "
            "main module, so a script must start it under `if __name__ == \"__main__\":`"
        ) from None


@contextlib.contextmanager
def _environment_restored() -> Iterator[None]:
    """Undo what the nannies of a local cluster write into this process's environment.

    They run in this process and set variables such as ``OMP_NUM_THREADS=1`` here before
    spawning each worker; processes this one starts later must not inherit them.
    """
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# Task functions already unpickled in this worker process, by digest of their pickle.
_UNPICKLED: dict[str, Callable[..., Any]] = {}
_MAX_UNPICKLED = 4


def _call_pickled(digest: str, payload: bytes, args: tuple[Any, ...]) -> Any:
    fn = _UNPICKLED.get(digest)
    if fn is None:
        import cloudpickle

        fn = cloudpickle.loads(payload)
        if len(_UNPICKLED) >= _MAX_UNPICKLED:
            _UNPICKLED.clear()
        _UNPICKLED[digest] = fn
    return fn(*args)


def _total_threads(client: Any) -> int | None:
    try:
        return sum(client.nthreads().values())
    except Exception:  # a scheduler hiccup must not end the run; the window just stays as it was
        return None


def run_tasks_dask(
    fn: Callable[..., Any],
    args_list: Sequence[tuple[Any, ...]],
    client: Any,
    key_prefix: str = "sbi-gen-task",
) -> Iterator[tuple[int, Any]]:
    """Run ``fn(*args)`` on the cluster for every tuple in ``args_list``; yield ``(index, result)`` as each finishes.

    ``fn`` must be pure: Dask reruns a task whose worker died, and recomputes a result lost with
    its worker before the client fetched it. Each index is yielded exactly once. An exception in
    a task is re-raised here after the pending tasks are cancelled.

    Arguments:
        fn: The task; pickled with cloudpickle, so it may be a closure or hold user objects.
        args_list: Arguments of each task (picklable).
        client: A ``distributed.Client`` (see :func:`dask_client`).
        key_prefix: Start of the task keys shown by the Dask dashboard.

    Raises:
        DaskError: ``fn`` cannot be pickled, or a task kept killing the workers that ran it.
    """
    distributed = require_distributed()
    import cloudpickle

    try:
        payload = cloudpickle.dumps(fn)
    except Exception as error:
        raise DaskError(f"the task cannot be sent to Dask workers: pickling failed ({type(error).__name__}: {error})") from None
    digest = hashlib.sha256(payload).hexdigest()[:16]
    queue = list(enumerate(args_list))[::-1]
    pending: dict[Any, int] = {}
    finished: set[int] = set()
    completed = distributed.as_completed(loop=client.loop)
    window, recounted = _MIN_IN_FLIGHT, -float("inf")

    def top_up() -> None:
        nonlocal window, recounted
        if time.monotonic() - recounted > _RECOUNT_SECONDS:
            threads = _total_threads(client)
            if threads is not None:
                window = max(_MIN_IN_FLIGHT, _IN_FLIGHT_PER_THREAD * threads)
            recounted = time.monotonic()
        while queue and len(pending) < window:
            index, args = queue.pop()
            # The key is a hash of the function and its arguments: equal keys are equal tasks, so a
            # task left on the scheduler by an earlier (killed) client can only be shared, never confused.
            task_hash = hashlib.sha256(digest.encode() + cloudpickle.dumps(args)).hexdigest()[:16]
            future = client.submit(_call_pickled, digest, payload, args, key=f"{key_prefix}-{index}-{task_hash}")
            pending[future] = index
            completed.add(future)

    try:
        top_up()
        for future in completed:
            index = pending.pop(future)
            try:
                result = future.result()
            except distributed.KilledWorker as error:
                raise DaskError(
                    f"a task kept killing the Dask workers that ran it ({_first_line(error)}): "
                    "out of memory, or a crash inside the task?"
                ) from None
            future.release()
            if index not in finished:
                finished.add(index)
                yield index, result
            top_up()
    finally:
        if pending:
            with contextlib.suppress(Exception):
                client.cancel(list(pending))
