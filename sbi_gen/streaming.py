"""Out-of-core reading of HDF5 training sets: chunk-shuffled batches with flat memory.

A file too large for memory is read in *blocks*: the smallest row ranges made of whole HDF5
chunks of both datasets read (``theta`` and ``x`` by default), so every read decompresses each
chunk it touches exactly once. Each pass over the data

1. shuffles the order of the blocks (a seeded permutation per epoch),
2. reads a few blocks at a time (about ``buffer_bytes``) into a shuffle buffer, dropping rows
   whose ``valid`` flag is false and rows with non-finite values,
3. shuffles the rows within the buffer and yields full batches; the rows left over are carried
   into the next buffer, so every kept row appears exactly once per pass.

A background thread does the reading, decompression and shuffling while the training step
runs, through a bounded queue, so at most a few buffers are held at any time whatever the size
of the file. h5py (3.x) releases the GIL inside ``H5Dread``, decompression included, so the
reads overlap the training step (a pure-Python loop keeps most of its speed beside a reading
thread). Batches depend only on the seed and the epoch, never on timing.

The training/validation split of a streamed file is by whole blocks:
:func:`~sbi_gen.store.train_val_split` applied to the block indices with the training seed,
so no index of all rows is ever held in memory.

Example:
    >>> import tempfile, simulators
    >>> from sbi_gen.store import simulate_to_hdf5
    >>> path = tempfile.mkdtemp() + "/moons.h5"
    >>> _ = simulate_to_hdf5(simulators.get("two_moons"), n=1000, path=path, seed=1, chunk_size=100, progress=False)
    >>> stream = ChunkStream(path, batch_size=64, seed=0)
    >>> stream.layout.block_rows, stream.layout.n_blocks
    (100, 10)
    >>> theta, x = next(iter(stream))
    >>> theta.shape, x.shape
    (torch.Size([64, 2]), torch.Size([64, 2]))
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

__all__ = ["ChunkLayout", "ChunkStream", "chunk_layout", "read_blocks", "valid_counts"]

# Default shuffle buffer: a few whole blocks, about this many bytes (at least two blocks).
BUFFER_BYTES = 32 << 20
# An unchunked dataset is read in blocks of about this many bytes.
_CONTIGUOUS_BLOCK_BYTES = 1 << 20
# When the chunkings of the datasets share no small common multiple, blocks follow the
# dataset with the longest chunks rather than grow beyond this many of them.
_MAX_LCM_FACTOR = 16
# Rows of the ``valid`` flags read at once when counting them.
_VALID_SLICE = 1 << 20


@dataclass(frozen=True)
class ChunkLayout:
    """How the rows of a file are cut into blocks of whole HDF5 chunks.

    Block ``i`` holds rows ``[i * block_rows, min((i + 1) * block_rows, n_rows))``.

    Attributes:
        n_rows: Rows in the file.
        block_rows: Rows per block: a multiple of the chunk length of every dataset read.
        row_bytes: Bytes of one row of all datasets read, as stored.
    """

    n_rows: int
    block_rows: int
    row_bytes: int

    @property
    def n_blocks(self) -> int:
        return -(-self.n_rows // self.block_rows)

    def bounds(self, block: int) -> tuple[int, int]:
        """``(start, stop)`` rows of ``block``."""
        start = int(block) * self.block_rows
        return start, min(start + self.block_rows, self.n_rows)

    def blocks_per_buffer(self, buffer_bytes: int) -> int:
        """Blocks read into one shuffle buffer of about ``buffer_bytes`` (at least 2)."""
        return max(2, int(buffer_bytes) // max(self.block_rows * self.row_bytes, 1))


def _row_bytes(dataset: h5py.Dataset) -> int:
    return int(np.prod(dataset.shape[1:], dtype=np.int64)) * dataset.dtype.itemsize


def chunk_layout(path: str | os.PathLike[str], keys: Sequence[str] = ("theta", "x")) -> ChunkLayout:
    """The block layout of ``path`` for reading the datasets ``keys``.

    Blocks span the least common multiple of the datasets' chunk lengths (store files: the
    simulation chunk size), so they never cut an HDF5 chunk. Unchunked datasets get blocks of
    about 1 MiB.

    Example:
        >>> import tempfile, h5py, numpy as np
        >>> path = tempfile.mkdtemp() + "/d.h5"
        >>> with h5py.File(path, "w") as f:
        ...     _ = f.create_dataset("theta", data=np.zeros((1000, 2)), chunks=(200, 2))
        ...     _ = f.create_dataset("x", data=np.zeros((1000, 8)), chunks=(50, 8))
        >>> chunk_layout(path).block_rows
        200
    """
    with h5py.File(path, "r") as handle:
        missing = [key for key in keys if key not in handle]
        if missing:
            raise KeyError(f"{path} has no dataset {missing[0]!r}")
        datasets = [handle[key] for key in keys]
        n_rows = int(datasets[0].shape[0])
        for key, dataset in zip(keys, datasets, strict=True):
            if int(dataset.shape[0]) != n_rows:
                raise ValueError(f"{path}: dataset {key!r} has {dataset.shape[0]} rows, {keys[0]!r} has {n_rows}")
        row_bytes = sum(_row_bytes(d) for d in datasets)
        lengths = [int(d.chunks[0]) for d in datasets if d.chunks is not None]
    if lengths:
        block_rows = math.lcm(*lengths)
        if block_rows > _MAX_LCM_FACTOR * max(lengths):
            block_rows = max(lengths)
    else:
        block_rows = max(1, _CONTIGUOUS_BLOCK_BYTES // max(row_bytes, 1))
    return ChunkLayout(n_rows=n_rows, block_rows=max(1, min(block_rows, n_rows)), row_bytes=row_bytes)


def valid_counts(path: str | os.PathLike[str], layout: ChunkLayout) -> np.ndarray:
    """Rows flagged valid in each block, ``(n_blocks,)`` int64 (all rows where there is no ``valid``).

    Reads the flags in slices, so memory does not grow with the file.
    """
    if layout.n_rows == 0:
        return np.zeros(0, dtype=np.int64)
    with h5py.File(path, "r") as handle:
        if "valid" not in handle:
            counts = np.full(layout.n_blocks, layout.block_rows, dtype=np.int64)
            counts[-1] = layout.n_rows - (layout.n_blocks - 1) * layout.block_rows
            return counts
        flags = handle["valid"]
        counts = np.zeros(layout.n_blocks, dtype=np.int64)
        # Slices are whole numbers of blocks, so each block is counted within one slice.
        step = max(1, _VALID_SLICE // layout.block_rows) * layout.block_rows
        for start in range(0, layout.n_rows, step):
            piece = np.asarray(flags[start : start + step], dtype=bool)
            first = start // layout.block_rows
            starts = np.arange(0, len(piece), layout.block_rows)
            counts[first : first + len(starts)] = np.add.reduceat(piece.astype(np.int64), starts)
    return counts


class _BlockReader:
    """Reads blocks from an open file: valid, finite rows of ``y`` and ``c`` as float arrays."""

    def __init__(self, handle: h5py.File, layout: ChunkLayout, y_key: str, c_key: str, dtype: np.dtype):
        self.layout = layout
        self.y = handle[y_key]
        self.c = handle[c_key]
        self.valid = handle["valid"] if "valid" in handle else None
        self.dtype = dtype

    def read(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ys, cs = [], []
        # Ascending block order: sequential reads; the caller shuffles the rows anyway.
        for block in np.sort(blocks):
            start, stop = self.layout.bounds(block)
            keep = np.ones(stop - start, dtype=bool) if self.valid is None else np.asarray(self.valid[start:stop], bool)
            if not keep.any():
                continue
            y = np.asarray(self.y[start:stop], dtype=self.dtype)
            c = np.asarray(self.c[start:stop], dtype=self.dtype)
            keep &= np.isfinite(y.reshape(len(y), -1)).all(axis=1) & np.isfinite(c.reshape(len(c), -1)).all(axis=1)
            ys.append(y[keep])
            cs.append(c[keep])
        if not ys:
            return (
                np.zeros((0, *self.y.shape[1:]), dtype=self.dtype),
                np.zeros((0, *self.c.shape[1:]), dtype=self.dtype),
            )
        return np.concatenate(ys), np.concatenate(cs)


def read_blocks(
    path: str | os.PathLike[str],
    blocks: Sequence[int] | np.ndarray,
    layout: ChunkLayout | None = None,
    y_key: str = "theta",
    c_key: str = "x",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """The valid, finite rows of ``blocks`` (in file order) as tensors ``(y, c)``.

    Example:
        >>> import tempfile, simulators
        >>> from sbi_gen.store import simulate_to_hdf5
        >>> path = tempfile.mkdtemp() + "/moons.h5"
        >>> _ = simulate_to_hdf5(simulators.get("two_moons"), n=300, path=path, seed=1, chunk_size=100, progress=False)
        >>> theta, x = read_blocks(path, [0, 2])
        >>> theta.shape
        torch.Size([200, 2])
    """
    layout = layout or chunk_layout(path, (y_key, c_key))
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    with h5py.File(path, "r") as handle:
        y, c = _BlockReader(handle, layout, y_key, c_key, np_dtype).read(np.asarray(blocks, dtype=np.int64))
    return torch.from_numpy(y), torch.from_numpy(c)


class _End:
    """Marks the end of a pass in the prefetch queue."""


@dataclass
class _Failure:
    """An exception raised in the reading thread, re-raised in the consumer."""

    error: BaseException


class ChunkStream:
    """Batches ``(y, c)`` of an HDF5 training set, read block by block in shuffled order.

    Iterating gives one pass (epoch 0 on the first ``iter``, then 1, 2, ...);
    :meth:`batches` gives any epoch. See the module docstring for the reading scheme.

    Arguments:
        path: The HDF5 file.
        blocks: Indices of the blocks to read (see :attr:`layout`); ``None``: all. Training
            and validation sets, and the shards of distributed processes, are sets of blocks.
        y_key: Dataset playing ``y`` (``"theta"`` for NPE).
        c_key: Dataset playing ``c`` (``"x"`` for NPE).
        batch_size: Rows per batch.
        shuffle: Shuffle blocks and rows (``False``: file order, e.g. for validation).
        drop_last: Drop the final incomplete batch of a pass.
        seed: Seed of the shuffles; pass ``e`` of epoch ``e`` is a function of ``(seed, e)``.
        buffer_bytes: Size of the shuffle buffer (at least two blocks are read at once).
        prefetch_buffers: Buffers' worth of batches the reading thread may prepare ahead.
        pin_memory: Return page-locked tensors (faster, asynchronous copies to a GPU).
        dtype: Floating dtype of the batches.

    Example:
        >>> import tempfile, simulators
        >>> from sbi_gen.store import simulate_to_hdf5
        >>> path = tempfile.mkdtemp() + "/moons.h5"
        >>> _ = simulate_to_hdf5(simulators.get("two_moons"), n=1000, path=path, seed=1, chunk_size=100, progress=False)
        >>> stream = ChunkStream(path, batch_size=300, seed=0)
        >>> [len(theta) for theta, x in stream.batches(epoch=0)]
        [300, 300, 300, 100]
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        blocks: Sequence[int] | np.ndarray | None = None,
        *,
        y_key: str = "theta",
        c_key: str = "x",
        batch_size: int = 256,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        buffer_bytes: int = BUFFER_BYTES,
        prefetch_buffers: int = 2,
        pin_memory: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if int(seed) < 0:
            raise ValueError(f"the seed must be a non-negative integer, got {seed}")
        if int(prefetch_buffers) < 1:
            raise ValueError(f"prefetch_buffers must be at least 1, got {prefetch_buffers}")
        self.path = os.fspath(path)
        self.y_key, self.c_key = y_key, c_key
        self.layout = chunk_layout(self.path, (y_key, c_key))
        all_blocks = np.arange(self.layout.n_blocks, dtype=np.int64)
        self.blocks = all_blocks if blocks is None else np.asarray(blocks, dtype=np.int64).reshape(-1)
        if len(self.blocks) and (self.blocks.min() < 0 or self.blocks.max() >= self.layout.n_blocks):
            raise ValueError(f"block indices must lie in [0, {self.layout.n_blocks}) for {self.path}")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.blocks_per_buffer = self.layout.blocks_per_buffer(buffer_bytes)
        buffer_rows = self.blocks_per_buffer * self.layout.block_rows
        self.queue_size = max(2, int(prefetch_buffers) * -(-buffer_rows // self.batch_size))
        self.pin_memory = bool(pin_memory)
        self.dtype = dtype
        self._np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        self._epoch = 0

    def valid_rows(self) -> int:
        """Rows flagged valid in this stream's blocks (rows with non-finite values flagged valid
        are dropped when read, so a pass can yield slightly fewer)."""
        return int(valid_counts(self.path, self.layout)[self.blocks].sum())

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, self._epoch = self._epoch, self._epoch + 1
        return self.batches(epoch)

    def batches(self, epoch: int = 0, limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of pass ``epoch``.

        Arguments:
            epoch: Which pass (its shuffles are seeded by ``(seed, epoch)``).
            limit: Exactly this many batches: stop early, or, when the pass runs out first,
                continue with fresh passes over the same blocks (reshuffled), as distributed
                samplers pad shards so that every process takes the same number of steps.
        """
        if limit is not None and int(limit) < 0:
            raise ValueError(f"limit must be non-negative, got {limit}")
        out: queue.Queue[Any] = queue.Queue(maxsize=self.queue_size)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(int(epoch), limit, out, stop), daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if isinstance(item, _End):
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()
            thread.join()

    def _produce(self, epoch: int, limit: int | None, out: queue.Queue[Any], stop: threading.Event) -> None:
        try:
            with h5py.File(self.path, "r") as handle:
                reader = _BlockReader(handle, self.layout, self.y_key, self.c_key, self._np_dtype)
                produced = 0
                repeat = 0
                while limit is None or produced < limit:
                    rng = np.random.default_rng([self.seed, epoch, repeat])
                    before = produced
                    for batch in self._pass(reader, rng):
                        if limit is not None and produced >= limit:
                            break
                        if not _put(out, batch, stop):
                            return
                        produced += 1
                    if limit is None:
                        break
                    if produced == before and produced < limit:
                        raise RuntimeError(
                            f"{self.path}: the blocks of this stream hold no valid rows to fill {limit} batches"
                        )
                    repeat += 1
            _put(out, _End(), stop)
        except BaseException as error:
            _put(out, _Failure(error), stop)

    def _pass(self, reader: _BlockReader, rng: np.random.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        order = rng.permutation(self.blocks) if self.shuffle else self.blocks
        carry_y, carry_c = reader.read(order[:0])
        for start in range(0, len(order), self.blocks_per_buffer):
            y, c = reader.read(order[start : start + self.blocks_per_buffer])
            y, c = np.concatenate([carry_y, y]), np.concatenate([carry_c, c])
            if self.shuffle:
                permutation = rng.permutation(len(y))
                y, c = y[permutation], c[permutation]
            full = len(y) // self.batch_size * self.batch_size
            yield from self._split(y[:full], c[:full])
            carry_y, carry_c = y[full:], c[full:]
        if len(carry_y) and not self.drop_last:
            yield from self._split(carry_y, carry_c)

    def _split(self, y: np.ndarray, c: np.ndarray) -> Iterator[tuple[Tensor, Tensor]]:
        if not len(y):
            return
        y_t, c_t = torch.from_numpy(np.ascontiguousarray(y)), torch.from_numpy(np.ascontiguousarray(c))
        if self.pin_memory:
            # One page-locked copy per buffer; the batches are views of it.
            y_t, c_t = y_t.pin_memory(), c_t.pin_memory()
        yield from zip(y_t.split(self.batch_size), c_t.split(self.batch_size), strict=True)


def _put(out: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has gone; ``False`` if it has."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False
