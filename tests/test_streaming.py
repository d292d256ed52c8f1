"""Out-of-core training: chunk-shuffled streaming of real HDF5 files, and `fit` on streams."""

import itertools
import math
import threading

import h5py
import numpy as np
import pytest
import torch

from sbi_gen.estimators import build_estimator
from sbi_gen.priors import Gaussian
from sbi_gen.simulate import as_simulator
from sbi_gen.store import simulate_to_hdf5
from sbi_gen.streaming import ChunkStream, chunk_layout, read_blocks, valid_counts
from sbi_gen.train import TrainConfig, fit

N_ROWS = 1050  # ten full blocks of 100 rows and a short one


def _write(path, n=N_ROWS, holes=True, compression=None):
    """theta[:, 0] is the row index, so every batch says which rows it holds. With ``holes``,
    some rows are flagged invalid and some flagged valid hold NaN or inf."""
    rows = np.arange(n)
    theta = np.stack([rows, -rows], axis=1).astype(np.float64)
    x = np.stack([np.sin(rows), np.cos(rows), rows / n], axis=1).astype(np.float32)
    valid = np.ones(n, dtype=bool)
    if holes:
        valid[rows % 7 == 3] = False
        x[rows % 11 == 5, 1] = np.nan
        theta[rows % 13 == 6, 1] = np.inf
    kwargs = {"compression": "gzip"} if compression else {}
    with h5py.File(path, "w") as f:
        f.create_dataset("theta", data=theta, chunks=(100, 2), **kwargs)
        f.create_dataset("x", data=x, chunks=(50, 3), **kwargs)
        f.create_dataset("valid", data=valid, chunks=(min(n, 512),))
    kept = valid & np.isfinite(theta).all(1) & np.isfinite(x).all(1)
    return rows[kept]


def _ids(batches):
    return [theta[:, 0].long().tolist() for theta, _ in batches]


@pytest.fixture
def holey(tmp_path):
    path = tmp_path / "holey.h5"
    return path, _write(path)


def test_layout_follows_the_hdf5_chunks(holey):
    path, _ = holey
    layout = chunk_layout(path)
    # Blocks span whole chunks of both datasets: lcm(100, 50).
    assert (layout.block_rows, layout.n_blocks, layout.n_rows) == (100, 11, N_ROWS)
    assert layout.bounds(10) == (1000, N_ROWS)
    with h5py.File(path) as f:
        flags = f["valid"][:]
    expected = [int(flags[i * 100 : (i + 1) * 100].sum()) for i in range(11)]
    assert valid_counts(path, layout).tolist() == expected


def test_every_kept_row_once_per_epoch_in_a_new_order(holey):
    path, kept = holey
    stream = ChunkStream(path, batch_size=64, seed=3, buffer_bytes=1)
    epochs = [_ids(stream) for _ in range(3)]  # iterating again gives the next epoch
    for batches in epochs:
        rows = [row for batch in batches for row in batch]
        # Exactly the valid, finite rows: invalid rows and rows with NaN/inf never appear.
        assert sorted(rows) == kept.tolist()
        assert all(len(batch) == 64 for batch in batches[:-1]) and 0 < len(batches[-1]) <= 64
    orders = [[row for batch in batches for row in batch] for batches in epochs]
    assert orders[0] != orders[1] != orders[2] != orders[0]


def test_epochs_are_reproducible_with_the_seed(holey):
    path, _ = holey
    first = ChunkStream(path, batch_size=50, seed=11, buffer_bytes=1)
    again = ChunkStream(path, batch_size=50, seed=11, buffer_bytes=1)
    other = ChunkStream(path, batch_size=50, seed=12, buffer_bytes=1)
    assert _ids(first.batches(epoch=4)) == _ids(again.batches(epoch=4))
    assert _ids(first.batches(epoch=4)) != _ids(other.batches(epoch=4))
    theta, x = next(iter(first.batches(epoch=0)))
    assert theta.dtype == x.dtype == torch.float32 and x.shape == (50, 3)


def test_reads_whole_chunks_in_shuffled_chunk_order(tmp_path):
    path = tmp_path / "full.h5"
    _write(path, n=1000, holes=False, compression="gzip")
    # Two blocks of 100 rows per buffer and batches of 50: each run of four batches is exactly
    # two whole blocks (HDF5 chunks of theta, pairs of chunks of x), with no row carried over.
    stream = ChunkStream(path, batch_size=50, seed=0, buffer_bytes=1)
    assert stream.blocks_per_buffer == 2
    visits = []
    for epoch in range(2):
        batches = _ids(stream.batches(epoch))
        buffers = [list(itertools.chain(*batches[i : i + 4])) for i in range(0, len(batches), 4)]
        blocks = [sorted({row // 100 for row in rows}) for rows in buffers]
        for rows, pair in zip(buffers, blocks, strict=True):
            assert len(pair) == 2
            assert sorted(rows) == [*range(pair[0] * 100, pair[0] * 100 + 100), *range(pair[1] * 100, pair[1] * 100 + 100)]
        visits.append([block for pair in blocks for block in pair])
        assert sorted(visits[-1]) == list(range(10))
    # Chunk order is shuffled, differently in each epoch (and not the file order).
    assert visits[0] != visits[1] and list(range(10)) not in visits


def test_a_subset_of_blocks_and_file_order_without_shuffle(holey):
    path, kept = holey
    stream = ChunkStream(path, blocks=[7, 2], batch_size=1000, shuffle=False)
    (ids,) = _ids(stream.batches(0))
    assert ids == [r for r in kept.tolist() if r // 100 in (2, 7)]
    theta, x = read_blocks(path, [2, 7])
    assert theta[:, 0].long().tolist() == ids and x.shape == (len(ids), 3)
    assert stream.valid_rows() == int(valid_counts(path, stream.layout)[[2, 7]].sum())


def test_limit_stops_early_or_pads_with_a_reshuffled_pass(holey):
    path, kept = holey
    stream = ChunkStream(path, batch_size=100, seed=1, drop_last=True)
    full = len(kept) // 100
    padded = _ids(stream.batches(0, limit=full + 5))
    assert len(padded) == full + 5 and all(len(b) == 100 for b in padded)
    assert padded[:full] == _ids(stream.batches(0))  # the first pass as usual, then a new one
    assert len(set(itertools.chain(*padded[full:]))) == 500  # no row repeated within the extra pass
    assert _ids(stream.batches(0, limit=2)) == padded[:2]
    before = threading.active_count()
    batches = stream.batches(1)
    next(batches)
    batches.close()  # the consumer leaves early: the reading thread ends
    assert threading.active_count() == before


def test_read_errors_reach_the_consumer(tmp_path):
    path = tmp_path / "broken.h5"
    _write(path, n=1000, holes=False, compression="gzip")
    with h5py.File(path) as f:
        chunk = f["x"].id.get_chunk_info(7)
    with open(path, "r+b") as handle:  # garble one compressed chunk of x
        handle.seek(chunk.byte_offset)
        handle.write(b"\xff" * chunk.size)
    stream = ChunkStream(path, batch_size=100, shuffle=False)
    with pytest.raises(OSError):
        list(stream.batches(0))
    with pytest.raises(KeyError, match="no dataset 'z'"):
        ChunkStream(path, c_key="z")
    with pytest.raises(ValueError, match=r"block indices must lie in \[0, 10\)"):
        ChunkStream(path, blocks=[10])


# ---------------------------------------------------------------------------- fit


SIGMA = 0.5  # x = θ + SIGMA ε with θ ~ N(0, 1): the posterior is N(x / (1 + SIGMA²), SIGMA² / (1 + SIGMA²))


@pytest.fixture(scope="module")
def gaussian_file(tmp_path_factory):
    prior = Gaussian([0.0], scale=1.0)
    sim = as_simulator(lambda theta, rng: theta + SIGMA * rng.normal(size=theta.shape), prior, name="g", observable_shape=(1,))
    path = tmp_path_factory.mktemp("stream") / "gaussian.h5"
    simulate_to_hdf5(sim, n=10_000, path=path, seed=3, chunk_size=250, progress=False)
    return path


def test_streamed_fit_learns_as_well_as_in_memory_fit(gaussian_file):
    generator = torch.Generator().manual_seed(99)
    theta = torch.randn(20_000, 1, generator=generator)
    x = theta + SIGMA * torch.randn(20_000, 1, generator=generator)
    posterior_var = SIGMA**2 / (1 + SIGMA**2)
    entropy = 0.5 * math.log(2 * math.pi * math.e * posterior_var)  # E[-log p(θ | x)], the best possible loss
    excess = {}
    for streaming in (False, True):
        torch.manual_seed(0)
        est = build_estimator("nsf", 1, (1,), transforms=2, hidden_features=[32, 32])
        history = fit(est, gaussian_file, config=TrainConfig(max_epochs=8, progress=False, streaming=streaming))
        assert history.streaming is streaming and history.n_train + history.n_val == 10_000
        with torch.no_grad():
            nll = -est(x).log_prob(theta)
        excess[streaming] = (float(nll.mean()) - entropy, float(nll.std()) / math.sqrt(len(nll)))
    # Held-out NLL minus the exact posterior's entropy is the expected KL(p || q). 0.05 nats is
    # the KL between Gaussians whose means differ by 0.32 posterior standard deviations; both
    # models must be that close, up to three standard errors of the held-out estimate.
    for kl, standard_error in excess.values():
        assert kl < 0.05 + 3 * standard_error, excess


def test_fit_streams_automatically_above_the_threshold(gaussian_file):
    est = build_estimator("nsf", 1, (1,), transforms=1, hidden_features=[8])
    small = fit(est, gaussian_file, config=TrainConfig(max_epochs=1, progress=False, streaming_threshold=10**12))
    large = fit(est, gaussian_file, config=TrainConfig(max_epochs=1, progress=False, streaming_threshold=1))
    assert not small.streaming and large.streaming
    # The chunk split: whole chunks of 250 rows, a tenth of them (4 of 40) for validation.
    assert (large.n_train, large.n_val) == (9000, 1000)


def test_streaming_input_errors(gaussian_file, tmp_path):
    est = build_estimator("nsf", 1, (1,), transforms=1, hidden_features=[8])
    with pytest.raises(ValueError, match="streaming=True needs the path of an HDF5 training set"):
        fit(est, (torch.randn(50, 1), torch.randn(50, 1)), config=TrainConfig(streaming=True, progress=False))
    with pytest.raises(ValueError, match="streaming must be True, False or None"):
        TrainConfig(streaming="yes")
    one_chunk = tmp_path / "one.h5"
    prior = Gaussian([0.0], scale=1.0)
    simulate_to_hdf5(as_simulator(lambda t: t, prior, observable_shape=(1,)), n=100, path=one_chunk, seed=0, progress=False)
    with pytest.raises(ValueError, match="split into training and validation by whole chunks"):
        fit(est, one_chunk, config=TrainConfig(streaming=True, progress=False))
