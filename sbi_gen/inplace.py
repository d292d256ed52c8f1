"""Uncompressed training sets written in place: every simulation chunk is written once, by
whoever simulated it, straight to its final bytes in the HDF5 file.

How it works. The file is created (in ``PATH.partial/``) as soon as the first chunk is
simulated and its array shapes are known: every dataset chunked by rows (HDF5 chunks that tile
a simulation chunk exactly, as in the compressed layout), allocated in full at creation
(``H5D_ALLOC_TIME_EARLY``, no fill) and never filtered. The byte offset of every HDF5 chunk is
then fixed; it is recorded in ``layout.json`` beside the file. A worker that finishes a
simulation chunk writes its rows with ``pwrite`` at those offsets (no HDF5 call, so nothing of
the file's metadata is touched and workers never contend for it); once they are flushed to disk
the coordinating process appends one line to the journal ``done.jsonl``. Only then does a chunk
count as done, so a journalled chunk survives even a power cut.

Why a kill at any moment loses nothing: the metadata was written and closed before any row;
a chunk whose rows were partly written is not in the journal and is simulated again, from the
same random stream, into the same bytes; a torn last journal line is ignored. The only HDF5
write after creation is the final one (counts and ``complete = True``), done just before the
rename to ``PATH``. If a kill tears that, the next run finds a file that does not open or does
not match its layout and rebuilds it: a fresh file with the same datasets, into which the
journalled chunks' bytes are copied from the recorded offsets (``layout.json`` names the
current file, so a rebuild interrupted in turn is simply repeated).

Compared with the compressed path (chunk files assembled at the end), rows cross memory once
instead of three times and the coordinating process does no copying, so the store costs little
beside the simulation itself and workers scale.

Example:
    >>> import tempfile, simulators
    >>> from sbi_gen.store import simulate_to_hdf5, load
    >>> path = tempfile.mkdtemp() + "/moons.h5"
    >>> _ = simulate_to_hdf5(simulators.get("two_moons"), 500, path, seed=1, compression=None, progress=False)
    >>> load(path).x.shape
    torch.Size([500, 2])
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = [
    "LayoutError",
    "append_journal",
    "chunk_datasets",
    "create_file",
    "finish_file",
    "piece_rows",
    "read_journal",
    "recover",
    "sync_file",
    "write_chunk",
]

LAYOUT = "layout.json"
JOURNAL = "done.jsonl"
_DATA = "data-{}.h5"
# HDF5 chunks hold about this many bytes and always tile a simulation chunk exactly.
_H5_CHUNK_BYTES = 1 << 20


class LayoutError(ValueError):
    """A simulated chunk does not fit the file made from the first chunk."""


def piece_rows(chunk_size: int, row_bytes: int) -> int:
    """Rows per HDF5 chunk: a divisor of ``chunk_size`` giving chunks of about 1 MiB."""
    pieces = max(1, -(-chunk_size * max(row_bytes, 1) // _H5_CHUNK_BYTES))
    while chunk_size % pieces:
        pieces += 1
    return chunk_size // pieces


def chunk_datasets(chunk: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of a simulated chunk by dataset name (``theta``, ``x``, ``valid``, groups)."""
    datasets = {"theta": chunk["theta"], "x": chunk["x"], "valid": chunk["valid"]}
    for group in ("latents", "augmented"):
        datasets.update({f"{group}/{key}": value for key, value in chunk[group].items()})
    return datasets


def _spec(chunk: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = {}
    for name, value in chunk_datasets(chunk).items():
        if value.dtype.kind not in "biuf":
            raise LayoutError(f"{name} has dtype {value.dtype}; the store keeps numbers and booleans only")
        spec[name] = {"dtype": value.dtype.str, "shape": list(value.shape[1:])}
    return spec


def create_file(partial: Path, run: dict[str, Any], chunk: dict[str, Any] | None = None,
                spec: dict[str, dict[str, Any]] | None = None, generation: int = 0, save: bool = True) -> dict[str, Any]:
    """Create the preallocated file for ``run`` from a first simulated ``chunk`` (or a ``spec``
    of dtypes and row shapes) and return its layout, saved as ``layout.json`` last of all
    (with ``save``; a rebuild saves it only once the old chunks are copied)."""
    spec = spec if spec is not None else _spec(chunk)
    n, chunk_size = int(run["n_simulations"]), int(run["chunk_size"])
    name = _DATA.format(generation)
    tmp = partial / f"{name}.tmp"
    datasets: dict[str, dict[str, Any]] = {}
    with h5py.File(tmp, "w") as handle:
        for key, value in run.items():
            handle.attrs[key] = value
        handle.attrs["complete"] = False
        for dataset, meta in spec.items():
            dtype, row_shape = np.dtype(meta["dtype"]), tuple(int(s) for s in meta["shape"])
            row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
            # A dataset shorter than one chunk holds a single (whole) simulation chunk.
            rows = min(piece_rows(chunk_size, row_bytes), n)
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # every chunk's address is fixed now
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # and nothing is written there yet
            created = handle.create_dataset(dataset, shape=(n, *row_shape), dtype=dtype, chunks=(rows, *row_shape), dcpl=dcpl)
            zeros = (0,) * len(row_shape)
            offsets = []
            for start in range(0, n, rows):
                info = created.id.get_chunk_info_by_coord((start, *zeros))
                if info.byte_offset is None or info.size != rows * row_bytes:
                    raise RuntimeError(f"HDF5 did not preallocate {dataset} as asked")  # pragma: no cover
                offsets.append(int(info.byte_offset))
            datasets[dataset] = {**meta, "rows": rows, "row_bytes": row_bytes, "offsets": offsets}
    os.replace(tmp, partial / name)
    layout = {"file": name, "generation": generation, "datasets": datasets}
    if save:
        save_layout(partial, layout)
    return layout


def save_layout(partial: Path, layout: dict[str, Any]) -> None:
    """Make ``layout`` (and the file it names) the run's current one, atomically."""
    _write_atomic(partial / LAYOUT, json.dumps(layout))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _pieces(layout: dict[str, Any], dataset: str, index: int, n_rows: int, chunk_size: int) -> list[tuple[int, int]]:
    """(first row within the chunk, byte offset) of each HDF5 chunk of simulation chunk ``index``."""
    meta = layout["datasets"][dataset]
    rows = int(meta["rows"])
    first = index * chunk_size // rows
    return [(start, int(meta["offsets"][first + j])) for j, start in enumerate(range(0, n_rows, rows))]


def write_chunk(
    partial: Path, layout: dict[str, Any], index: int, chunk: dict[str, Any], chunk_size: int, sync: bool = False
) -> dict[str, Any]:
    """Write simulation chunk ``index`` at its offsets (and to disk, with ``sync``); return its
    journal entry.

    Raises:
        LayoutError: if the chunk's arrays differ in name, dtype or shape from the first chunk's.
    """
    datasets = chunk_datasets(chunk)
    expected = layout["datasets"]
    if sorted(datasets) != sorted(expected):
        raise LayoutError(f"chunk {index} returned the arrays {sorted(datasets)}, the first chunk {sorted(expected)}")
    for name, value in datasets.items():
        meta = expected[name]
        if value.dtype.str != meta["dtype"] or list(value.shape[1:]) != meta["shape"]:
            raise LayoutError(
                f"chunk {index} returned {name} as {value.dtype} rows of shape {tuple(value.shape[1:])}, "
                f"the first chunk as {np.dtype(meta['dtype'])} rows of shape {tuple(meta['shape'])}"
            )
    n_rows = len(chunk["x"])
    fd = os.open(partial / layout["file"], os.O_WRONLY)
    try:
        for name, value in datasets.items():
            rows = int(expected[name]["rows"])
            value = np.ascontiguousarray(value)
            for start, offset in _pieces(layout, name, index, n_rows, chunk_size):
                piece = value[start : start + rows]
                if len(piece) < rows:  # the last rows of the file: HDF5 stores whole chunks
                    piece = np.concatenate([piece, np.zeros((rows - len(piece), *piece.shape[1:]), piece.dtype)])
                _pwrite_all(fd, memoryview(piece.reshape(-1).view(np.uint8)), offset)
        if sync:
            _datasync(fd)
    finally:
        os.close(fd)
    return {
        "index": int(index),
        "n_valid": int(np.count_nonzero(chunk["valid"])),
        "n_failed": int(chunk["n_failed"]),
        "first_error": str(chunk["first_error"]),
    }


def _datasync(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)


def sync_file(partial: Path, layout: dict[str, Any]) -> None:
    """Flush every row written so far to disk (before the chunks are journalled)."""
    fd = os.open(partial / layout["file"], os.O_WRONLY)
    try:
        _datasync(fd)
    finally:
        os.close(fd)


def append_journal(partial: Path, entry: dict[str, Any]) -> None:
    """Mark a chunk done: one line, appended in a single write."""
    fd = os.open(partial / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)


def read_journal(partial: Path, n_chunks: int) -> dict[int, dict[str, Any]]:
    """The chunks marked done, by index; a line torn by a kill is ignored."""
    try:
        text = (partial / JOURNAL).read_text()
    except FileNotFoundError:
        return {}
    done = {}
    for line in text.split("\n")[:-1]:  # the part after the last newline was never finished
        with contextlib.suppress(ValueError, KeyError, TypeError):
            entry = json.loads(line)
            if 0 <= int(entry["index"]) < n_chunks:
                done[int(entry["index"])] = entry
    return done


def _matches(path: Path, layout: dict[str, Any]) -> bool:
    try:
        with h5py.File(path, "r") as handle:
            for name, meta in layout["datasets"].items():
                dataset = handle[name]
                zeros = (0,) * (dataset.ndim - 1)
                rows = int(meta["rows"])
                for j in (0, len(meta["offsets"]) - 1):
                    info = dataset.id.get_chunk_info_by_coord((j * rows, *zeros))
                    if info.byte_offset != meta["offsets"][j]:
                        return False
    except (OSError, KeyError, RuntimeError, ValueError):
        return False
    return True


def recover(partial: Path, run: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    """The layout and journal of an unfinished run in ``partial`` (``None`` and ``{}`` if none).

    A file that no longer opens or matches its layout (a kill during the final write) is
    rebuilt from the journalled chunks' bytes.
    """
    try:
        layout = json.loads((partial / LAYOUT).read_text())
    except (OSError, ValueError):
        layout = None
    if layout is None:
        # Killed before the layout was saved: no chunk was journalled yet, start afresh.
        for stale in [*partial.glob("data-*.h5*"), partial / JOURNAL]:
            stale.unlink(missing_ok=True)
        return None, {}
    done = read_journal(partial, int(run["n_chunks"]))
    current = partial / layout["file"]
    if not current.exists():  # removed by hand: its chunks are gone with it
        (partial / LAYOUT).unlink()
        return recover(partial, run)
    if not _matches(current, layout):
        layout = _rebuild(partial, run, layout, done)
    for stale in partial.glob("data-*.h5*"):
        if stale.name != layout["file"]:
            stale.unlink()
    return layout, done


def _rebuild(partial: Path, run: dict[str, Any], old: dict[str, Any], done: dict[int, dict[str, Any]]) -> dict[str, Any]:
    spec = {name: {"dtype": meta["dtype"], "shape": meta["shape"]} for name, meta in old["datasets"].items()}
    new = create_file(partial, run, spec=spec, generation=int(old["generation"]) + 1, save=False)
    n, chunk_size = int(run["n_simulations"]), int(run["chunk_size"])
    source = os.open(partial / old["file"], os.O_RDONLY)
    target = os.open(partial / new["file"], os.O_WRONLY)
    try:
        for index in done:
            n_rows = min(chunk_size, n - index * chunk_size)
            for name, meta in old["datasets"].items():
                size = int(meta["rows"]) * int(meta["row_bytes"])
                pieces = zip(_pieces(old, name, index, n_rows, chunk_size), _pieces(new, name, index, n_rows, chunk_size), strict=True)
                for (_, read_at), (_, write_at) in pieces:
                    _pwrite_all(target, memoryview(os.pread(source, size, read_at)), write_at)
    finally:
        os.close(source)
        os.close(target)
    # Only now does the new file become the current one: a kill before this repeats the rebuild.
    save_layout(partial, new)
    return new


def finish_file(partial: Path, layout: dict[str, Any], attrs: dict[str, Any]) -> Path:
    """Write the final attributes (counts, ``complete``) into the file and make it durable.

    Returns the finished file's path, still inside ``partial``, for the caller to rename.
    """
    path = partial / layout["file"]
    with h5py.File(path, "r+") as handle:
        for key, value in attrs.items():
            handle.attrs[key] = value
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path
