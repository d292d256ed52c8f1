"""Training sets on disk: one self-describing HDF5 format, written crash-safe, read as tensors.

Layout of a finished file (readable with plain h5py):

- datasets ``theta`` (n, D), ``x`` (n, *shape), ``valid`` (n,) bool, optional ``latents/<name>``
  and ``augmented/<name>``, all chunked by rows and compressed;
- root attributes ``format`` (``"sbi_gen.simulations"``), ``format_version``, ``complete``,
  ``simulator``, ``simulator_version``, ``simulator_config`` (JSON), ``prior`` (JSON),
  ``parameter_names`` / ``parameter_units`` / ``observable_names`` (JSON), ``observable_shape``,
  ``seed``, ``n_simulations``, ``chunk_size``, ``n_chunks``, ``n_valid``, ``n_nonfinite``,
  ``n_failed``, ``first_error``, ``package_version``.

How a run survives a crash: chunk ``i`` (rows ``i*chunk_size`` onwards) is simulated from the
``i``-th stream of ``SeedSequence(seed).spawn(n_chunks)``. With compression (the default), the
worker that simulated it compresses it and saves it as its own file in ``PATH.partial/`` by an
atomic rename, so a chunk file is either whole or absent; the HDF5 file is assembled from them
when every chunk is in. Without compression (``compression=None``), the file is preallocated in
``PATH.partial/`` and each chunk's rows are written once, in place, then journalled (see
:mod:`sbi_gen.inplace`): much less copying, for fast simulators. Either way the finished file is
renamed to ``PATH`` only when complete, so ``PATH`` never exists unfinished. Running the same
command again after a kill simulates only the missing chunks, and the result is identical,
dataset by dataset, to an uninterrupted run with any number of workers, local or on a Dask
cluster (``executor="dask"``, see :mod:`sbi_gen.dask_executor`), compressed or not.

Example:
    >>> import tempfile, simulators
    >>> path = tempfile.mkdtemp() + "/moons.h5"
    >>> summary = simulate_to_hdf5(simulators.get("two_moons"), n=1000, path=path, seed=1, progress=False)
    >>> data = load(path)
    >>> data.theta.shape, data.x.shape
    (torch.Size([1000, 2]), torch.Size([1000, 2]))
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from sbi_gen import inplace
from sbi_gen.parallel import run_tasks
from sbi_gen.priors import Prior, prior_from_dict
from sbi_gen.simulate import check_simulator, chunk_seeds, run_chunk

try:  # ISA-L's deflate: standard zlib streams (any HDF5 reader inflates them), about 5x faster
    from isal.isal_zlib import compress as _deflate
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same datasets
    from zlib import compress as _deflate

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_SEED",
    "RUN_KEYS",
    "SimulationSummary",
    "StoreError",
    "TrainingSet",
    "check_seed",
    "load",
    "read_info",
    "simulate_to_hdf5",
    "train_val_split",
]

FORMAT = "sbi_gen.simulations"
FORMAT_VERSION = 1
_SHARD = "chunk-{:07d}.bin"
_MANIFEST = "run.json"
# The fields that identify a run: a resume or re-run must agree on all of them.
RUN_KEYS = ("simulator", "simulator_version", "simulator_config", "prior", "seed", "n_simulations", "chunk_size")


class StoreError(ValueError):
    """A training-set file or run that cannot be used as asked; the message says why."""


# The seed is recorded as an int64 HDF5 attribute: a larger one would fail only after the last chunk.
MAX_SEED = 2**63 - 1


def check_seed(seed: Any) -> int:
    """``seed`` as an ``int`` if it is a root seed the store can record (0 to :data:`MAX_SEED`),
    else :class:`StoreError` saying so."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise StoreError(f"the seed must be an integer from 0 to {MAX_SEED} (2**63 - 1), got {seed!r}")
    return int(seed)


def _package_version() -> str:
    from sbi_gen import __version__

    return __version__


def _partial_dir(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


@dataclass
class SimulationSummary:
    """What :func:`simulate_to_hdf5` did; ``str()`` gives a one-screen report."""

    path: str
    n_simulations: int
    n_valid: int
    n_nonfinite: int
    n_failed: int
    first_error: str
    seconds: float
    chunks_resumed: int
    n_chunks: int
    already_complete: bool = False
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def simulations_per_second(self) -> float:
        simulated = self.n_simulations * (1 - self.chunks_resumed / max(self.n_chunks, 1))
        return simulated / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        lines = [f"training set    {self.path}"]
        if self.already_complete:
            lines.append("status          already complete: nothing simulated")
        lines += [
            f"simulations     {self.n_simulations:,} ({self.n_valid:,} valid, {self.n_nonfinite:,} non-finite, {self.n_failed:,} failed)",
            f"chunks          {self.n_chunks} ({self.chunks_resumed} resumed from an earlier run)",
            f"time            {self.seconds:.2f} s ({self.simulations_per_second:,.0f} simulations/s)",
        ]
        for name, shape in self.shapes.items():
            lines.append(f"  {name:<14}{shape}")
        if self.first_error:
            lines.append(f"first error     {self.first_error}")
        return "\n".join(lines)


def _run_description(simulator: Any, prior: Any, n: int, seed: int, chunk_size: int, compression: str | None) -> dict[str, Any]:
    config = simulator.config() if hasattr(simulator, "config") else {}
    return {
        "simulator": str(simulator.name),
        "simulator_version": str(getattr(simulator, "version", "0")),
        "simulator_config": _json(config),
        "prior": _json(prior.to_dict()),
        "seed": int(seed),
        "n_simulations": int(n),
        "chunk_size": int(chunk_size),
        "n_chunks": -(-int(n) // int(chunk_size)),
        "compression": compression or "none",
        "parameter_names": _json(list(simulator.parameter_names)),
        "parameter_units": _json(list(getattr(simulator, "parameter_units", None) or [""] * len(simulator.parameter_names))),
        "observable_names": _json(getattr(simulator, "observable_names", None)),
        "observable_shape": list(simulator.observable_shape),
    }


def _same_prior(a: Any, b: Any) -> bool:
    """Priors compared as distributions: a run recorded when bounds were written with float32's
    long decimals (0.10000000149011612) is the same run as one written with 0.1."""
    if a == b:
        return True
    try:
        return prior_from_dict(json.loads(a)).to_dict() == prior_from_dict(json.loads(b)).to_dict()
    except (TypeError, ValueError, KeyError):
        return False


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [
        key for key in RUN_KEYS
        if not (_same_prior(a.get(key), b.get(key)) if key == "prior" else a.get(key) == b.get(key))
    ]


# Deflate is skipped for a chunk whose sample (8 slices of 1 KiB spread over the shuffled bytes,
# so every byte plane is seen) does not shrink below this ratio: noise-like data (e.g. maps with
# pixel noise) costs compression time and saves nothing.
_SAMPLE_SLICES, _SLICE_BYTES = 8, 1 << 10
_WORTH_COMPRESSING = 0.9
_SKIP_ALL_FILTERS = 0b11  # HDF5 filter mask: bit i set = filter i (shuffle, deflate) not applied


def _sample(data: bytes) -> bytes:
    if len(data) <= _SAMPLE_SLICES * _SLICE_BYTES:
        return data
    step = (len(data) - _SLICE_BYTES) // (_SAMPLE_SLICES - 1)
    return b"".join(data[k * step : k * step + _SLICE_BYTES] for k in range(_SAMPLE_SLICES))


def _encode(array: np.ndarray, rows: int, compression: str | None) -> tuple[list[Any], list[int], list[int]]:
    """Split ``array`` into HDF5 chunks of ``rows`` rows (the last zero-padded) and run each
    through the filters of the dataset (byte shuffle, then deflate) exactly as HDF5 would.

    Returns the encoded chunks (bytes-like), their sizes and their HDF5 filter masks.
    """
    n = len(array)
    padded_rows = -(-n // rows) * rows
    if padded_rows != n:
        array = np.concatenate([array, np.zeros((padded_rows - n, *array.shape[1:]), dtype=array.dtype)])
    array = np.ascontiguousarray(array)
    pieces: list[Any] = []
    masks = []
    for start in range(0, padded_rows, rows):
        raw = array[start : start + rows]
        if compression == "gzip":
            # HDF5's shuffle leaves 1-byte types as they are.
            shuffled = raw.view(np.uint8).reshape(-1, raw.dtype.itemsize).T.tobytes() if raw.dtype.itemsize > 1 else raw.tobytes()
            sample = _sample(shuffled)
            if len(_deflate(sample, 1)) < _WORTH_COMPRESSING * len(sample):
                pieces.append(_deflate(shuffled, 1))
                masks.append(0)
                continue
            masks.append(_SKIP_ALL_FILTERS)
        else:
            masks.append(0)
        pieces.append(raw.reshape(-1).view(np.uint8))
    return pieces, [len(memoryview(p).cast("B")) for p in pieces], masks


# A chunk file: this line, the header's length (8 bytes, little-endian), the JSON header, then
# the ``valid`` flags and every dataset's encoded HDF5 chunks, back to back.
_SHARD_MAGIC = b"sbi_gen chunk 2\n"


def _encode_shard(chunk: dict[str, Any], chunk_size: int, compression: str | None) -> list[Any]:
    """A simulated chunk as the parts of its chunk file: HDF5 chunks already encoded, plus counts."""
    datasets = inplace.chunk_datasets(chunk)
    valid = np.ascontiguousarray(datasets.pop("valid"), dtype=bool).view(np.uint8)
    parts: list[Any] = [valid]
    index = {}
    for name, value in datasets.items():
        if value.dtype.kind not in "biuf":  # as in place: refused at the first chunk, not after the run
            raise inplace.LayoutError(f"{name} has dtype {value.dtype}; the store keeps numbers and booleans only")
        # HDF5 chunks tile a simulation chunk exactly: workers compress them, the writer only copies.
        rows = inplace.piece_rows(chunk_size, value[0].nbytes if len(value) else value.itemsize)
        pieces, sizes, masks = _encode(value, rows, compression)
        parts += pieces
        index[name] = {"rows": rows, "shape": list(value.shape[1:]), "dtype": value.dtype.str, "sizes": sizes, "masks": masks}
    header = json.dumps({
        "datasets": index,
        "n_rows": len(chunk["x"]),
        "n_failed": int(chunk["n_failed"]),
        "first_error": str(chunk["first_error"]),
        "body_bytes": len(valid) + sum(sum(meta["sizes"]) for meta in index.values()),
    }).encode()
    return [_SHARD_MAGIC, len(header).to_bytes(8, "little"), header, *parts]


def _shard(header: dict[str, Any], valid: np.ndarray, pieces: Iterator[Any]) -> dict[str, Any]:
    """A chunk as the assembler takes it: its header's counts, its ``valid`` flags and, per
    dataset, its encoded HDF5 chunks (``pieces`` yields them in the header's order)."""
    for meta in header["datasets"].values():
        meta["pieces"] = [next(pieces) for _ in meta["sizes"]]
    return {
        "valid": valid.view(bool),
        "n_rows": int(header["n_rows"]),
        "n_failed": int(header["n_failed"]),
        "first_error": str(header["first_error"]),
        "datasets": header["datasets"],
    }


def _shard_from_parts(parts: list[Any]) -> dict[str, Any]:
    """What :func:`_load_shard` reads back from a chunk file, from the parts written to it (no copy)."""
    return _shard(json.loads(parts[2]), np.asarray(parts[3]), iter(parts[4:]))


def _write_shard(path: Path, parts: list[Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        for part in parts:
            handle.write(part)
    os.replace(tmp, path)  # atomic: a chunk file is either complete or absent


def _shard_header(handle: Any) -> tuple[dict[str, Any], int]:
    """The header of an open chunk file and the file's expected size; ValueError if it is not one."""
    magic = handle.read(len(_SHARD_MAGIC))
    if magic != _SHARD_MAGIC:
        raise ValueError("not an sbi_gen chunk file")
    length = int.from_bytes(handle.read(8), "little")
    header = json.loads(handle.read(length))
    return header, len(_SHARD_MAGIC) + 8 + length + int(header["body_bytes"])


def _load_shard(source: Path | bytes) -> dict[str, Any]:
    if isinstance(source, Path):
        with open(source, "rb") as handle:
            header, _ = _shard_header(handle)
            offset, size = handle.tell(), os.fstat(handle.fileno()).st_size
        # Mapped, not read: HDF5 copies the pages straight into the file, one copy fewer.
        body = np.memmap(source, dtype=np.uint8, mode="r", offset=offset) if size > offset else np.zeros(0, np.uint8)
    else:
        handle = io.BytesIO(source)
        header, _ = _shard_header(handle)
        body = np.frombuffer(source, dtype=np.uint8, offset=handle.tell())
    if len(body) != int(header["body_bytes"]):
        raise StoreError(f"a chunk file of the unfinished run is truncated: {source if isinstance(source, Path) else 'from a worker'}")
    n_rows = int(header["n_rows"])
    ends = np.cumsum([n_rows] + [size for meta in header["datasets"].values() for size in meta["sizes"]])
    return _shard(header, body[:n_rows], (body[start:end] for start, end in itertools.pairwise(ends)))


def _shard_ok(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            _, size = _shard_header(handle)
        return path.stat().st_size == size
    except (OSError, ValueError, KeyError):
        return False


def _simulate_chunk_to_shard(
    simulator: Any,
    prior: Any,
    chunk_size: int,
    compression: str | None,
    index: int,
    size: int,
    seed_sequence: np.random.SeedSequence,
    shard: Path,
) -> dict[str, Any]:
    chunk = run_chunk(simulator, prior, size, seed_sequence)
    _write_shard(shard, _encode_shard(chunk, chunk_size, compression))
    return {"index": index}


def _simulate_chunk_to_bytes(
    simulator: Any,
    prior: Any,
    chunk_size: int,
    compression: str | None,
    size: int,
    seed_sequence: np.random.SeedSequence,
) -> bytes:
    # A pure function of its arguments: Dask may run it twice (a lost worker) with the same result.
    return b"".join(_encode_shard(run_chunk(simulator, prior, size, seed_sequence), chunk_size, compression))


# The assembler hands the kernel what it has written every this many bytes (see _Assembler).
_SYNC_BEHIND_BYTES = 8 << 20


class _Assembler:
    """Copies encoded chunks into the temporary HDF5 file at their row offsets, in any order.

    The finished file is synced to disk before it is renamed into place. So that this last sync
    does not wait for the whole file, a thread syncs what has been written so far every
    :data:`_SYNC_BEHIND_BYTES` (``fdatasync`` releases the GIL): the disk works while chunks
    are still being simulated.
    """

    def __init__(self, path: Path, run: dict[str, Any], compression: str | None):
        self.path = path
        self.run = run
        self.compression = compression
        self.file = h5py.File(path, "w")
        self._sync_fd = os.open(path, os.O_RDONLY)
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="sbi-gen-sync")
        self._sync: Future | None = None
        self._unsynced = 0
        self.datasets: dict[str, Any] = {}  # h5py's lookup by name costs more than a chunk write
        self.valid = np.zeros(run["n_simulations"], dtype=bool)
        self.n_failed = 0
        self.first_errors: dict[int, str] = {}

    def _create(self, shard: dict[str, Any]) -> None:
        n = self.run["n_simulations"]
        for name, meta in shard["datasets"].items():
            row_shape = tuple(int(s) for s in meta["shape"])
            # Unlimited first axis: an HDF5 chunk may then be longer than a small dataset.
            kwargs: dict[str, Any] = {"chunks": (int(meta["rows"]), *row_shape), "maxshape": (None, *row_shape)}
            if self.compression == "gzip":
                kwargs.update(compression="gzip", compression_opts=1, shuffle=True)
            self.datasets[name] = self.file.create_dataset(
                name, shape=(n, *row_shape), dtype=np.dtype(str(meta["dtype"])), **kwargs
            )

    def write(self, index: int, shard: dict[str, Any]) -> None:
        if not self.datasets:
            self._create(shard)
        # Encoded bytes of another dtype or row shape would be copied in as they are: garbage, silently.
        if sorted(shard["datasets"]) != sorted(self.datasets):
            raise inplace.LayoutError(f"chunk {index} returned the arrays {sorted(shard['datasets'])}, the first chunk {sorted(self.datasets)}")
        for name, meta in shard["datasets"].items():
            dataset = self.datasets[name]
            if np.dtype(meta["dtype"]) != dataset.dtype or tuple(meta["shape"]) != dataset.shape[1:]:
                raise inplace.LayoutError(
                    f"chunk {index} returned {name} as {np.dtype(meta['dtype'])} rows of shape {tuple(meta['shape'])}, "
                    f"the first chunk as {dataset.dtype} rows of shape {dataset.shape[1:]}"
                )
        start = index * self.run["chunk_size"]
        for name, meta in shard["datasets"].items():
            chunk_writer = self.datasets[name].id
            rows = int(meta["rows"])
            zeros = (0,) * len(meta["shape"])
            for j, (piece, mask) in enumerate(zip(meta["pieces"], meta["masks"], strict=True)):
                chunk_writer.write_direct_chunk((start + j * rows, *zeros), piece, filter_mask=mask)
        self._unsynced += sum(sum(meta["sizes"]) for meta in shard["datasets"].values())
        if self._unsynced >= _SYNC_BEHIND_BYTES and (self._sync is None or self._sync.done()):
            self._sync = self._syncer.submit(getattr(os, "fdatasync", os.fsync), self._sync_fd)
            self._unsynced = 0
        self.valid[start : start + shard["n_rows"]] = shard["valid"]
        self.n_failed += shard["n_failed"]
        if shard["first_error"]:
            self.first_errors[index] = shard["first_error"]

    def finish(self) -> dict[str, Any]:
        n = self.run["n_simulations"]
        self.file.create_dataset("valid", data=self.valid, chunks=(min(n, 1 << 16),))
        counts = _counts(n, int(self.valid.sum()), self.n_failed, self.first_errors)
        for key, value in _final_attrs(self.run, counts).items():
            self.file.attrs[key] = value
        shapes = {name: tuple(self.file[name].shape) for name in ("theta", "x")}
        for group in ("latents", "augmented"):
            shapes.update({f"{group}/{k}": tuple(v.shape) for k, v in self.file.get(group, {}).items()})
        self.file.flush()
        self.file.close()
        self._stop_syncing()
        if self._sync is not None:
            self._sync.result()  # a failed sync (a disk error) fails the run, as the last one would
        with open(self.path, "rb+") as handle:
            os.fsync(handle.fileno())
        return {**counts, "shapes": shapes}

    def _stop_syncing(self) -> None:
        self._syncer.shutdown(wait=True)
        if self._sync_fd >= 0:  # once: a second close could close a file opened since under that number
            with contextlib.suppress(OSError):
                os.close(self._sync_fd)
            self._sync_fd = -1

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        self._stop_syncing()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        why = "is a file, not a directory" if parent.exists() else "does not exist"
        raise StoreError(f"cannot write {path}: {parent} {why}")
    if path.is_dir():
        raise StoreError(f"cannot write {path}: it is a directory")
    try:  # a real probe: permissions, read-only mounts and odd file systems all show up here
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".sbi_gen-probe-"):
            pass
    except OSError as error:
        raise StoreError(f"cannot write {path}: {error.strerror or error} in {parent}") from None


def simulate_to_hdf5(
    simulator: Any,
    n: int,
    path: str | os.PathLike[str],
    seed: int | None = None,
    chunk_size: int = 1000,
    workers: int = 1,
    prior: Any = None,
    overwrite: bool = False,
    compression: str | None = "gzip",
    progress: bool = True,
    executor: str = "local",
    scheduler: Any = None,
    dask_local_workers: int | None = None,
    connect_timeout: float = 10.0,
) -> SimulationSummary:
    """Simulate ``n`` (θ, x) pairs into an HDF5 training set, crash-safe and resumable.

    Arguments:
        simulator: An object following the simulator protocol (see :mod:`sbi_gen.simulate`).
        n: Number of simulations.
        path: Output file.
        seed: Root seed; ``None`` picks one at random (recorded in the file, and reused when an
            unfinished run at ``path`` is resumed).
        chunk_size: Simulations per chunk: the unit of parallel work, of random streams and of
            crash recovery. Part of the run's identity: the same seed and chunk size give the same data.
        workers: Local worker processes.
        prior: Distribution of θ; defaults to ``simulator.prior``.
        overwrite: Replace an existing file or unfinished run that differs from this one.
        compression: ``"gzip"`` (deflate level 1 after byte shuffle, done by the workers in
            parallel; any HDF5 reader decodes it; chunks that do not shrink are stored raw) or
            ``None`` (rows written in place: the store then costs little beside simulating,
            see ``benchmarks/bench_simulate.py``).
        progress: Show a progress bar on stderr.
        executor: ``"local"`` (``workers`` processes on this machine) or ``"dask"`` (a Dask
            cluster, see :mod:`sbi_gen.dask_executor`; the file is the same either way).
        scheduler: With ``executor="dask"``: a scheduler address (``"tcp://host:8786"``) or a
            ``distributed.Client``; ``None`` starts a local cluster for the run.
        dask_local_workers: Worker processes of that local cluster (default: one per core).
        connect_timeout: Seconds to wait for the scheduler at ``scheduler`` before giving up.

    Returns:
        A :class:`SimulationSummary`.
    """
    path = Path(path)
    check_simulator(simulator)
    prior = prior if prior is not None else getattr(simulator, "prior", None)
    if prior is None:
        raise StoreError(f"simulator {simulator.name!r} has no default prior: pass prior=")
    if not isinstance(prior, Prior):  # the file records it as JSON, which only these priors have
        raise StoreError(f"prior must be one of sbi_gen.priors (BoxUniform, Gaussian, IndependentPrior, ...), "
                         f"got {type(prior).__name__}")
    check_simulator(simulator, prior)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise StoreError(f"the number of simulations must be a positive integer, got {n!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
        raise StoreError(f"the chunk size must be a positive integer, got {chunk_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers <= 0:
        raise StoreError(f"the number of workers must be a positive integer, got {workers!r}")
    if compression not in (None, "gzip"):
        raise StoreError(f"compression must be 'gzip' or None, got {compression!r}")
    if seed is not None:
        check_seed(seed)
    _check_executor(executor, workers, scheduler, dask_local_workers, connect_timeout)
    _check_writable(path)
    with _exclusive_run(path):
        return _simulate_to_hdf5(
            simulator, prior, int(n), path, seed, int(chunk_size), int(workers), overwrite, compression, progress,
            executor, scheduler, dask_local_workers, connect_timeout,
        )


@contextlib.contextmanager
def _exclusive_run(path: Path) -> Iterator[None]:
    """Refuse a second process simulating into the same path at the same time.

    An advisory ``flock`` on ``PATH.lock``: the kernel drops it when its holder dies, so a killed
    run never blocks the next one. Two runs of one training set would otherwise both fill (and
    finish) the same unfinished file.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"another process is simulating into {path} right now; wait for it to finish or choose another path") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def _simulate_to_hdf5(
    simulator: Any,
    prior: Any,
    n: int,
    path: Path,
    seed: int | None,
    chunk_size: int,
    workers: int,
    overwrite: bool,
    compression: str | None,
    progress: bool,
    executor: str,
    scheduler: Any,
    dask_local_workers: int | None,
    connect_timeout: float,
) -> SimulationSummary:
    partial = _partial_dir(path)
    manifest_path = partial / _MANIFEST
    started = time.perf_counter()

    if seed is None and manifest_path.exists() and not overwrite:
        with contextlib.suppress(OSError, ValueError, KeyError):
            seed = int(json.loads(manifest_path.read_text())["seed"])
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**63))
    run = _run_description(simulator, prior, int(n), check_seed(seed), int(chunk_size), compression)

    if path.exists():
        existing = None
        with contextlib.suppress(StoreError):
            existing = read_info(path)
        if existing is not None and not _differences(existing, run) and not overwrite:
            shutil.rmtree(partial, ignore_errors=True)
            return SimulationSummary(
                str(path), run["n_simulations"], existing["n_valid"], existing["n_nonfinite"], existing["n_failed"],
                existing["first_error"], time.perf_counter() - started, run["n_chunks"], run["n_chunks"], True,
            )
        if not overwrite:
            what = "a different training set" if existing is not None else "a file that is not an sbi_gen training set"
            detail = f" (differs in {', '.join(_differences(existing, run))})" if existing is not None else ""
            raise StoreError(f"{path} already holds {what}{detail}; pass --overwrite (overwrite=True) to replace it")
        path.unlink()

    if partial.exists():
        try:
            previous = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            previous = None
        if previous is None or _differences(previous, run):
            if not overwrite:
                detail = f"differs in {', '.join(_differences(previous, run))}" if previous else "unreadable manifest"
                raise StoreError(
                    f"an unfinished run of a different training set is at {partial} ({detail}); "
                    "rerun it with its own settings, or pass --overwrite (overwrite=True) to discard it"
                )
            shutil.rmtree(partial)
        elif previous.get("compression") != run["compression"] and not overwrite:
            # Finished chunks are stored encoded: resuming must keep their encoding.
            raise StoreError(
                f"the unfinished run at {partial} was started with compression {previous.get('compression')}; "
                f"rerun with --compression {previous.get('compression')}, or pass --overwrite to start again"
            )
        elif previous.get("compression") != run["compression"]:
            shutil.rmtree(partial)

    n_chunks = run["n_chunks"]
    sizes = [min(chunk_size, n - i * chunk_size) for i in range(n_chunks)]
    seeds = chunk_seeds(int(seed), n_chunks)
    shards = [partial / _SHARD.format(i) for i in range(n_chunks)]
    layout, journal = inplace.recover(partial, run) if compression is None and partial.exists() else (None, {})
    if compression is None:
        finished = set(journal)
    else:
        finished = {i for i in range(n_chunks) if shards[i].exists() and _shard_ok(shards[i])}
    todo = [i for i in range(n_chunks) if i not in finished]

    # Connect (or start a local cluster) before writing anything: a mistyped scheduler address
    # leaves no unfinished run behind. No cluster is needed when every chunk is on disk.
    cluster = contextlib.ExitStack()
    client = None
    if executor == "dask" and todo:
        from sbi_gen.dask_executor import dask_client

        client = cluster.enter_context(dask_client(scheduler, dask_local_workers, connect_timeout))
    try:
        partial.mkdir(exist_ok=True)
        if not manifest_path.exists():
            tmp = manifest_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(run, indent=1))
            os.replace(tmp, manifest_path)
    except BaseException:
        cluster.close()
        raise
    bar = _progress_bar(n, progress, initial=sum(sizes[i] for i in finished))
    try:
        if compression is None:
            finished_file, counts = _fill_in_place(
                simulator, prior, run, partial, layout, journal, todo, sizes, seeds, workers, client, bar
            )
        else:
            finished_file, counts = _fill_from_shards(
                simulator, prior, run, path, todo, sizes, seeds, shards, workers, client, bar
            )
    finally:
        if bar is not None:
            bar.close()
        # Every result is in by now, or the run failed for its own reason: a cluster that is
        # slow to shut down must neither fail a finished run nor hide the first error.
        with contextlib.suppress(Exception):
            cluster.close()
    os.replace(finished_file, path)
    shutil.rmtree(partial, ignore_errors=True)
    return SimulationSummary(
        str(path), n, counts["n_valid"], counts["n_nonfinite"], counts["n_failed"], counts["first_error"],
        time.perf_counter() - started, n_chunks - len(todo), n_chunks, False, counts["shapes"],
    )


def _final_attrs(run: dict[str, Any], counts: dict[str, Any]) -> dict[str, Any]:
    """Root attributes of a finished file: the run, its counts, the format, ``complete``."""
    return {
        **run,
        **{key: value for key, value in counts.items() if key != "shapes"},
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": _package_version(),
        "complete": True,
    }


def _counts(n: int, n_valid: int, n_failed: int, first_errors: dict[int, str]) -> dict[str, Any]:
    return {
        "n_valid": int(n_valid),
        "n_failed": int(n_failed),
        "n_nonfinite": int(n - n_valid - n_failed),
        # The error of the earliest chunk, so the message does not depend on completion order.
        "first_error": first_errors[min(first_errors)] if first_errors else "",
    }


def _fill_from_shards(
    simulator: Any,
    prior: Any,
    run: dict[str, Any],
    path: Path,
    todo: list[int],
    sizes: list[int],
    seeds: list[np.random.SeedSequence],
    shards: list[Path],
    workers: int,
    client: Any,
    bar: Any,
) -> tuple[Path, dict[str, Any]]:
    """Compressed files: workers encode chunk files, this process assembles them at the end."""
    tmp_h5 = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    compression, chunk_size = run["compression"], int(run["chunk_size"])
    assembler = _Assembler(tmp_h5, run, compression)
    try:
        # Chunks already on disk from an earlier run go straight into the file.
        missing = set(todo)
        for i, shard in enumerate(shards):
            if i not in missing:
                assembler.write(i, _load_shard(shard))
        if client is not None:
            chunks = _dask_chunks(simulator, prior, chunk_size, compression, todo, sizes, seeds, shards, client)
        else:
            chunks = _local_chunks(simulator, prior, chunk_size, compression, todo, sizes, seeds, shards, workers)
        # closing(): an interrupted run stops its workers, or cancels its Dask tasks, at once.
        with contextlib.closing(chunks):
            for i, shard in chunks:
                assembler.write(i, shard)
                if bar is not None:
                    bar.update(sizes[i])
        return tmp_h5, assembler.finish()
    except BaseException as error:
        assembler.abort()
        if isinstance(error, inplace.LayoutError):
            raise StoreError(f"simulator {simulator.name!r}: {error}") from None
        raise


# A worker's copy of the run's layout, keyed by the layout file's identity (one run per pool).
_WORKER_LAYOUT: dict[tuple[str, int, int], dict[str, Any]] = {}


def _simulate_chunk_in_place(
    simulator: Any,
    prior: Any,
    partial: Path,
    chunk_size: int,
    index: int,
    size: int,
    seed_sequence: np.random.SeedSequence,
) -> dict[str, Any]:
    """Simulate a chunk and write it in place; before the file exists, return it instead."""
    chunk = run_chunk(simulator, prior, size, seed_sequence)
    try:
        stat = (partial / inplace.LAYOUT).stat()
    except FileNotFoundError:
        return {"index": index, "chunk": chunk}  # the coordinator creates the file from it
    key = (str(partial), stat.st_ino, stat.st_mtime_ns)
    if key not in _WORKER_LAYOUT:
        _WORKER_LAYOUT.clear()
        _WORKER_LAYOUT[key] = json.loads((partial / inplace.LAYOUT).read_text())
    return inplace.write_chunk(partial, _WORKER_LAYOUT[key], index, chunk, chunk_size)


def _write_here(
    partial: Path, run: dict[str, Any], layout: dict[str, Any] | None, index: int, chunk: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write (and flush) a chunk from this process, creating the file from it if it is the first.

    Returns the layout and the chunk's journal entry.
    """
    if layout is None:
        layout = inplace.create_file(partial, run, chunk)
    return layout, inplace.write_chunk(partial, layout, index, chunk, int(run["chunk_size"]), sync=True)


def _handle_behind(
    simulator: Any,
    prior: Any,
    todo: list[int],
    sizes: list[int],
    seeds: list[np.random.SeedSequence],
    handle: Callable[[int, dict[str, Any]], Any],
) -> Iterator[Any]:
    """One process: a thread runs ``handle(i, chunk)`` on chunk i while this one simulates chunk
    i + 1; yields the results in order. At most two chunks are held in memory.

    The store's work (compressing, writing, flushing) then runs on a spare core. Interrupted
    (Ctrl-C, a failing simulator), the chunk being handled is still finished, so what ``handle``
    saved of it is kept.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="sbi-gen-store") as helper:
        pending: Future | None = None
        try:
            for i in todo:
                chunk = run_chunk(simulator, prior, sizes[i], seeds[i])
                if pending is not None:
                    done, pending = pending, None
                    yield done.result()
                pending = helper.submit(handle, i, chunk)
            if pending is not None:
                done, pending = pending, None
                yield done.result()
        finally:
            if pending is not None:
                with contextlib.suppress(BaseException):
                    pending.result()


def _write_behind(
    simulator: Any,
    prior: Any,
    run: dict[str, Any],
    partial: Path,
    layout: dict[str, Any] | None,
    todo: list[int],
    sizes: list[int],
    seeds: list[np.random.SeedSequence],
    record: Callable[[dict[str, Any]], None],
) -> dict[str, Any] | None:
    """One process, uncompressed: chunk i is written, flushed and journalled in a thread while
    chunk i + 1 simulates (``pwrite`` and ``fdatasync`` release the GIL)."""
    state = {"layout": layout}

    def write(index: int, chunk: dict[str, Any]) -> None:
        # The thread also creates the file, from the first chunk, while chunk 2 simulates; it
        # journals each chunk itself, so a chunk on disk when a run is interrupted stays done.
        state["layout"], entry = _write_here(partial, run, state["layout"], index, chunk)
        record(entry)

    results = _handle_behind(simulator, prior, todo, sizes, seeds, write)
    with contextlib.closing(results):
        for _ in results:
            pass
    return state["layout"]


def _fill_in_place(
    simulator: Any,
    prior: Any,
    run: dict[str, Any],
    partial: Path,
    layout: dict[str, Any] | None,
    journal: dict[int, dict[str, Any]],
    todo: list[int],
    sizes: list[int],
    seeds: list[np.random.SeedSequence],
    workers: int,
    client: Any,
    bar: Any,
) -> tuple[Path, dict[str, Any]]:
    """Uncompressed files: each chunk is written once, at its final place (see :mod:`sbi_gen.inplace`)."""
    chunk_size = int(run["chunk_size"])

    def record(entry: dict[str, Any]) -> None:
        inplace.append_journal(partial, entry)
        journal[entry["index"]] = entry
        if bar is not None:
            bar.update(sizes[entry["index"]])

    try:
        if client is not None:
            from sbi_gen.dask_executor import run_tasks_dask

            # The cluster's workers return the arrays; this process writes them in place.
            task = functools.partial(run_chunk, simulator, prior)
            results = run_tasks_dask(task, [(sizes[i], seeds[i]) for i in todo], client, key_prefix="sbi-gen-chunk")
            with contextlib.closing(results):
                for position, chunk in results:
                    layout, entry = _write_here(partial, run, layout, todo[position], chunk)
                    record(entry)
        else:
            if workers == 1:
                layout = _write_behind(simulator, prior, run, partial, layout, todo, sizes, seeds, record)
            else:
                # Workers inherit the simulator through fork and write their own rows; the first
                # chunks, simulated before the file exists, come back here to create it.
                task = functools.partial(_simulate_chunk_in_place, simulator, prior, partial, chunk_size)
                results = run_tasks(task, [(i, sizes[i], seeds[i]) for i in todo], workers=workers)
                with contextlib.closing(results):
                    for _, out in results:
                        if "chunk" in out:
                            layout, entry = _write_here(partial, run, layout, out["index"], out["chunk"])
                            record(entry)
                        else:
                            assert layout is not None
                            inplace.sync_file(partial, layout)
                            record(out)
    except inplace.LayoutError as error:
        raise StoreError(f"simulator {simulator.name!r}: {error}") from None
    assert layout is not None
    n = int(run["n_simulations"])
    first_errors = {i: e["first_error"] for i, e in journal.items() if e["first_error"]}
    counts = _counts(n, sum(e["n_valid"] for e in journal.values()), sum(e["n_failed"] for e in journal.values()), first_errors)
    finished = inplace.finish_file(partial, layout, _final_attrs(run, counts))
    shapes = {name: (n, *meta["shape"]) for name, meta in layout["datasets"].items() if name != "valid"}
    return finished, {**counts, "shapes": shapes}


def _check_executor(executor: str, workers: int, scheduler: Any, dask_local_workers: int | None, connect_timeout: float) -> None:
    if executor not in ("local", "dask"):
        raise StoreError(f"executor must be 'local' or 'dask', got {executor!r}")
    if executor == "local":
        if scheduler is not None or dask_local_workers is not None:
            raise StoreError("a scheduler or dask_local_workers needs executor='dask'")
        return
    if workers != 1:
        raise StoreError(
            "workers (--workers) counts local processes; a Dask run uses the cluster's workers "
            "(dask_local_workers / --dask-local for a cluster on this machine)"
        )
    if scheduler is not None and dask_local_workers is not None:
        raise StoreError("give either a Dask scheduler or dask_local_workers (--dask-local), not both")
    if dask_local_workers is not None and (
        isinstance(dask_local_workers, bool) or not isinstance(dask_local_workers, (int, np.integer)) or dask_local_workers <= 0
    ):
        raise StoreError(f"the number of local Dask workers must be a positive integer, got {dask_local_workers!r}")
    if not connect_timeout > 0:
        raise StoreError(f"the connect timeout must be positive, got {connect_timeout!r} s")
    from sbi_gen.dask_executor import require_distributed

    require_distributed()  # fail before any file is touched, with the install command


def _local_chunks(
    simulator: Any,
    prior: Any,
    chunk_size: int,
    compression: str | None,
    todo: list[int],
    sizes: list[int],
    seeds: list[np.random.SeedSequence],
    shards: list[Path],
    workers: int,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Simulate chunks ``todo`` in local processes; yield ``(chunk index, shard)`` as each finishes."""
    if workers == 1:
        # One process: a thread encodes and saves chunk i while this one simulates chunk i + 1.
        def save(index: int, chunk: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            parts = _encode_shard(chunk, chunk_size, compression)
            _write_shard(shards[index], parts)
            return index, _shard_from_parts(parts)  # the file is for a resume; no need to read it back

        results = _handle_behind(simulator, prior, todo, sizes, seeds, save)
        with contextlib.closing(results):
            yield from results
        return
    # Workers inherit the simulator through fork: only chunk indices and seeds are pickled.
    task = functools.partial(_simulate_chunk_to_shard, simulator, prior, chunk_size, compression)
    tasks = [(i, sizes[i], seeds[i], shards[i]) for i in todo]
    for _, info in run_tasks(task, tasks, workers=workers):
        i = info["index"]
        yield i, _load_shard(shards[i])


def _dask_chunks(
    simulator: Any,
    prior: Any,
    chunk_size: int,
    compression: str | None,
    todo: list[int],
    sizes: list[int],
    seeds: list[np.random.SeedSequence],
    shards: list[Path],
    client: Any,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Simulate chunks ``todo`` on a Dask cluster; yield ``(chunk index, shard)`` as each finishes.

    Workers return the encoded shard bytes and this process writes them (atomically, as the local
    workers do): the cluster's workers need no access to this machine's file system.
    """
    from sbi_gen.dask_executor import run_tasks_dask

    task = functools.partial(_simulate_chunk_to_bytes, simulator, prior, chunk_size, compression)
    results = run_tasks_dask(task, [(sizes[i], seeds[i]) for i in todo], client, key_prefix="sbi-gen-chunk")
    with contextlib.closing(results):
        for position, data in results:
            i = todo[position]
            _write_shard(shards[i], [data])
            yield i, _load_shard(data)


def _progress_bar(total: int, enabled: bool, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="sim", desc="simulating", dynamic_ncols=True, smoothing=0.1)


# --------------------------------------------------------------------------- reading


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def read_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate a training-set file and return its metadata (root attributes, JSON decoded, plus shapes).

    Raises:
        StoreError: with a one-line reason for a missing, unfinished, truncated, corrupt or foreign file.
    """
    path = Path(path)
    if not path.exists():
        partial = _partial_dir(path)
        if (partial / _MANIFEST).exists():
            run = json.loads((partial / _MANIFEST).read_text())
            n_done = len(list(partial.glob("chunk-*.bin"))) + len(inplace.read_journal(partial, int(run["n_chunks"])))
            raise StoreError(
                f"{path} is unfinished: {n_done} of {run['n_chunks']} chunks are simulated in {partial}; "
                "run the same simulate command again to finish it"
            )
        raise StoreError(f"no such file: {path}")
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a training-set file")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise StoreError(f"{path} is not a readable HDF5 file (truncated or corrupt): {str(error).splitlines()[0]}") from None
    try:
        with handle:
            attrs = {key: _decode(handle.attrs[key]) for key in handle.attrs}
            if attrs.get("format") != FORMAT:
                raise StoreError(f"{path} is an HDF5 file but not an sbi_gen training set (no format attribute {FORMAT!r})")
            if int(attrs.get("format_version", -1)) > FORMAT_VERSION:
                raise StoreError(f"{path} has format version {attrs['format_version']}, newer than this sbi_gen reads ({FORMAT_VERSION})")
            if not attrs.get("complete", False):
                raise StoreError(f"{path} is marked unfinished; run the same simulate command again to finish it")
            n = int(attrs["n_simulations"])
            shapes: dict[str, tuple[int, ...]] = {}
            for name in ("theta", "x", "valid"):
                if name not in handle:
                    raise StoreError(f"{path} is missing the dataset {name!r}")
            for group in ("latents", "augmented"):
                for key in handle.get(group, {}):
                    shapes[f"{group}/{key}"] = tuple(handle[f"{group}/{key}"].shape)
            for name in ("theta", "x", "valid"):
                shapes[name] = tuple(handle[name].shape)
            for name, shape in shapes.items():
                if shape[0] != n:
                    raise StoreError(f"{path} is inconsistent: {name} has {shape[0]} rows, the file says {n} simulations")
                # What the store writes; anything else (strings, objects) would fail deep inside training.
                dtype = handle[name].dtype
                if dtype.kind not in ("b" if name == "valid" else "biuf"):
                    wanted = "booleans" if name == "valid" else "numbers"
                    raise StoreError(f"{path}: {name} has dtype {dtype.str}, not {wanted}: not an sbi_gen training set")
            for key in ("simulator_config", "prior", "parameter_names", "parameter_units", "observable_names"):
                if isinstance(attrs.get(key), str):
                    try:
                        attrs[key + "_decoded"] = json.loads(attrs[key])
                    except json.JSONDecodeError as error:
                        raise StoreError(f"{path}: the {key} attribute is not valid JSON ({error.msg})") from None
            # A hand-edited file (or another tool's) whose datasets disagree with its own description
            # would load and train on misread rows, or fail deep inside training.
            names = attrs.get("parameter_names_decoded")
            if isinstance(names, list) and shapes["theta"][1:] != (len(names),):
                raise StoreError(
                    f"{path} is inconsistent: theta has shape {shapes['theta']}, the file says "
                    f"{len(names)} parameters ({', '.join(map(str, names))})"
                )
            if len(shapes["theta"]) != 2:
                raise StoreError(f"{path} is inconsistent: theta has shape {shapes['theta']}, not (simulations, parameters)")
            if "observable_shape" in attrs:
                recorded = attrs["observable_shape"]
                recorded = tuple(recorded) if isinstance(recorded, list) else (recorded,)
                if shapes["x"][1:] != recorded:
                    raise StoreError(f"{path} is inconsistent: x has rows of shape {shapes['x'][1:]}, the file says observable_shape {recorded}")
            # Read the last rows: a truncated file fails here rather than during training.
            handle["x"][n - 1 : n]
            handle["valid"][n - 1 : n]
    except StoreError:
        raise
    except (OSError, KeyError, RuntimeError) as error:
        raise StoreError(f"{path} is corrupt or truncated: {str(error).splitlines()[0]}") from None
    attrs["shapes"] = shapes
    attrs["file_bytes"] = path.stat().st_size
    return attrs


@dataclass
class TrainingSet:
    """Simulations loaded from a file: tensors plus the file's metadata.

    ``theta`` (n, D), ``x`` (n, *shape), ``valid`` (n,) bool, and ``latents`` / ``augmented``
    dicts when asked for. ``rows`` are the file rows that were loaded.
    """

    theta: torch.Tensor
    x: torch.Tensor
    valid: torch.Tensor
    rows: np.ndarray
    info: dict[str, Any]
    latents: dict[str, torch.Tensor] = field(default_factory=dict)
    augmented: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.theta)

    @property
    def prior(self) -> Any:
        """The prior the file was simulated from."""
        return prior_from_dict(self.info["prior_decoded"])

    @property
    def parameter_names(self) -> list[str]:
        return list(self.info["parameter_names_decoded"])


def load(
    path: str | os.PathLike[str],
    rows: slice | Sequence[int] | None = None,
    valid_only: bool = True,
    latents: bool = False,
    augmented: bool = False,
    dtype: torch.dtype = torch.float32,
) -> TrainingSet:
    """Load a training set (all rows, a slice, or given rows) as tensors.

    Arguments:
        path: The file.
        rows: A slice, sorted row indices, or a boolean mask with one entry per row, to read;
            ``None`` reads everything.
        valid_only: Drop rows whose simulation failed or produced non-finite x.
        latents: Also load ``latents/*``.
        augmented: Also load ``augmented/*``.
        dtype: Floating dtype of the returned tensors.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise StoreError(f"dtype must be a floating torch dtype such as torch.float32, got {dtype!r}")
    info = read_info(path)
    n = int(info["n_simulations"])
    if rows is None:
        selection: Any = slice(0, n)
    elif isinstance(rows, slice):
        selection = slice(*rows.indices(n))
    else:
        selection = np.asarray(rows)
        if selection.dtype == bool:
            if selection.shape != (n,):
                raise StoreError(f"a boolean row mask needs one entry per row ({n}) of {path}, got shape {selection.shape}")
            selection = np.flatnonzero(selection)
        elif selection.size and not np.issubdtype(selection.dtype, np.integer):
            # Casting would read row 1 for 1.7: refuse rather than guess.
            raise StoreError(f"row indices must be integers (or a boolean mask), got {selection.dtype} values")
        selection = selection.astype(np.int64)
        if selection.ndim != 1 or (len(selection) and (selection.min() < 0 or selection.max() >= n)):
            raise StoreError(f"row indices must be 1-D and within [0, {n}) for {path}")
        if np.any(np.diff(selection) <= 0):
            raise StoreError("row indices must be sorted and unique")
    with h5py.File(path, "r") as handle:
        valid = handle["valid"][selection]
        index = np.arange(n)[selection]
        keep = valid if valid_only else np.ones_like(valid)

        def read(name: str) -> torch.Tensor:
            array = handle[name][selection][keep]
            tensor = torch.from_numpy(np.ascontiguousarray(array))
            return tensor.to(dtype) if tensor.is_floating_point() else tensor

        data = TrainingSet(
            theta=read("theta"),
            x=read("x"),
            valid=torch.from_numpy(valid[keep]),
            rows=index[keep],
            info=info,
        )
        for flag, group, target in ((latents, "latents", data.latents), (augmented, "augmented", data.augmented)):
            if flag:
                for key in handle.get(group, {}):
                    target[key] = read(f"{group}/{key}")
    return data


def train_val_split(n: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reproducible random split of ``n`` rows into sorted train and validation indices.

    Example:
        >>> train, val = train_val_split(10, 0.2, seed=0)
        >>> len(train), len(val)
        (8, 2)
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 rows to split into training and validation, got {n}")
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError(
            f"a validation fraction of {val_fraction} of {n} rows leaves {n - n_val} for training and {n_val} "
            "for validation; each part needs at least one row"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
