"""The HDF5 store: determinism, crash safety (real kill -9), accounting and clear errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib

import h5py
import numpy as np
import pytest
import torch

from sbi_gen.priors import BoxUniform
from sbi_gen.simulate import as_simulator, simulate
from sbi_gen.store import MAX_SEED, StoreError, load, read_info, simulate_to_hdf5, train_val_split

PRIOR = BoxUniform([0.0, 0.0], [1.0, 1.0], names=["a", "b"])


def _toy(theta, rng):
    x = theta + 0.1 * rng.normal(size=theta.shape)
    x[theta[:, 0] > 0.97] = np.nan  # a region where the "simulator" fails numerically
    return x


def _with_latents(theta, rng):
    return {"x": theta + rng.normal(size=theta.shape)}


TOY = as_simulator(_toy, PRIOR, name="toy", observable_shape=(2,))


def _datasets(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _assert_same(a, b):
    da, db = _datasets(a), _datasets(b)
    assert sorted(da) == sorted(db)
    for key in da:
        assert da[key].dtype == db[key].dtype, key
        assert np.array_equal(da[key], db[key], equal_nan=True), key


def _flaky(prior, stop_at: int):
    """A simulator that raises KeyboardInterrupt (Ctrl-C in the middle of a run) at call
    ``stop_at``; ``calls["n"] = 0`` rearms it."""
    calls = {"n": 0}

    def flaky(theta, rng):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return theta + rng.normal(size=theta.shape)

    return as_simulator(flaky, prior, name="flaky", observable_shape=(2,)), calls


def test_identical_across_worker_counts_and_equal_to_memory(tmp_path):
    one = simulate_to_hdf5(TOY, 5000, tmp_path / "w1.h5", seed=11, chunk_size=300, workers=1, progress=False)
    simulate_to_hdf5(TOY, 5000, tmp_path / "w2.h5", seed=11, chunk_size=300, workers=2, progress=False)
    _assert_same(tmp_path / "w1.h5", tmp_path / "w2.h5")
    # Uncompressed files are written in place by the workers: the same data, byte for byte.
    for workers in (1, 2):
        plain = tmp_path / f"plain{workers}.h5"
        summary = simulate_to_hdf5(TOY, 5000, plain, seed=11, chunk_size=300, workers=workers, compression=None, progress=False)
        _assert_same(tmp_path / "w1.h5", plain)
        assert (summary.n_valid, summary.n_nonfinite) == (one.n_valid, one.n_nonfinite)
        with h5py.File(plain) as f:
            assert f["x"].compression is None and f["x"].chunks is not None
    memory = simulate(TOY, n=5000, seed=11, chunk_size=300)
    data = load(tmp_path / "w1.h5", valid_only=False)
    assert np.array_equal(data.x.numpy(), memory["x"].astype(np.float32), equal_nan=True)
    assert np.array_equal(data.theta.numpy(), memory["theta"])
    # Non-finite outputs are flagged, counted and kept out of the default load.
    expected_invalid = int((~np.isfinite(memory["x"]).all(axis=1)).sum())
    assert expected_invalid > 0
    assert one.n_nonfinite == expected_invalid and one.n_valid == 5000 - expected_invalid
    info = read_info(tmp_path / "w1.h5")
    assert info["n_nonfinite"] == expected_invalid and info["n_failed"] == 0
    assert len(load(tmp_path / "w1.h5")) == 5000 - expected_invalid


class _CountsAndNoise:
    """x: small integer counts (compressible); latent ``noise``: full-precision normal draws (not)."""

    name = "counts"
    parameter_names = ["a", "b"]
    observable_shape = (64,)
    prior = PRIOR

    def simulate(self, theta, rng):
        counts = rng.poisson(3.0 * theta[:, :1], size=(len(theta), 64)).astype(np.float64)
        return {"x": counts, "latents": {"noise": rng.normal(size=(len(theta), 64))}}


def test_compressed_file_is_standard_deflate_and_noise_is_stored_raw(tmp_path):
    """Chunks that shrink are shuffled + deflated (zlib streams any HDF5 reader inflates);
    noise that would not shrink by 10 % is stored unfiltered, chunk by chunk."""
    sim = _CountsAndNoise()
    path = tmp_path / "counts.h5"
    simulate_to_hdf5(sim, 4000, path, seed=5, chunk_size=1000, workers=1, progress=False)
    memory = simulate(sim, n=4000, seed=5, chunk_size=1000)
    with h5py.File(path) as f:
        x, noise = f["x"], f["latents/noise"]
        assert x.compression == "gzip" and x.shuffle and noise.compression == "gzip"
        np.testing.assert_array_equal(x[()], memory["x"])
        np.testing.assert_array_equal(noise[()], memory["latents"]["noise"])
        for k in range(x.id.get_num_chunks()):
            info = x.id.get_chunk_info(k)
            assert info.filter_mask == 0 and info.size < 0.5 * x.chunks[0] * 64 * 8
            # Inflate one chunk by hand with zlib and undo the byte shuffle: the HDF5 standard.
            if k == 0:
                raw = np.frombuffer(zlib.decompress(x.id.read_direct_chunk(info.chunk_offset)[1]), np.uint8)
                rows = raw.reshape(8, -1).T.copy().view(np.float64).reshape(-1, 64)
                np.testing.assert_array_equal(rows, memory["x"][: x.chunks[0]])
        for k in range(noise.id.get_num_chunks()):
            info = noise.id.get_chunk_info(k)
            assert info.filter_mask == 0b11 and info.size == noise.chunks[0] * 64 * 8


def test_self_describing_attributes(tmp_path):
    simulate_to_hdf5(TOY, 100, tmp_path / "a.h5", seed=2, chunk_size=30, progress=False)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert f.attrs["format"] == "sbi_gen.simulations"
        assert f.attrs["complete"]
        assert f.attrs["seed"] == 2 and f.attrs["chunk_size"] == 30 and f.attrs["n_chunks"] == 4
        assert f["x"].compression == "gzip" and f["x"].shuffle and f["x"].chunks is not None
    data = load(tmp_path / "a.h5")
    assert data.parameter_names == ["a", "b"]
    assert data.prior.to_dict() == PRIOR.to_dict()


def test_raising_simulator_rows_marked_invalid_with_error(tmp_path):
    def fragile(theta):
        if np.any(theta[:, 1] < 0.1):
            raise FloatingPointError("negative variance")
        return theta.copy()

    sim = as_simulator(fragile, PRIOR, observable_shape=(2,), name="fragile")
    summary = simulate_to_hdf5(sim, 400, tmp_path / "f.h5", seed=0, chunk_size=100, progress=False)
    theta = load(tmp_path / "f.h5", valid_only=False).theta.numpy()
    assert summary.n_failed == int((theta[:, 1] < 0.1).sum()) > 0
    assert "FloatingPointError: negative variance" in summary.first_error
    assert read_info(tmp_path / "f.h5")["first_error"] == summary.first_error


def test_rerun_is_a_no_op_and_mismatches_are_refused(tmp_path):
    path = tmp_path / "a.h5"
    simulate_to_hdf5(TOY, 200, path, seed=1, chunk_size=50, progress=False)
    again = simulate_to_hdf5(TOY, 200, path, seed=1, chunk_size=50, progress=False)
    assert again.already_complete
    for kwargs, field in [({"seed": 2}, "seed"), ({"n": 300}, "n_simulations"), ({"chunk_size": 40}, "chunk_size")]:
        args = {"n": 200, "seed": 1, "chunk_size": 50, **kwargs}
        with pytest.raises(StoreError, match=f"different training set.*{field}.*--overwrite"):
            simulate_to_hdf5(TOY, args["n"], path, seed=args["seed"], chunk_size=args["chunk_size"], progress=False)
    other = as_simulator(_toy, BoxUniform([0.0, 0.0], [2.0, 1.0]), name="toy", observable_shape=(2,))
    with pytest.raises(StoreError, match="prior"):
        simulate_to_hdf5(other, 200, path, seed=1, chunk_size=50, progress=False)
    simulate_to_hdf5(TOY, 200, path, seed=2, chunk_size=50, overwrite=True, progress=False)
    assert read_info(path)["seed"] == 2


def test_unfinished_run_is_not_mistaken_for_complete_and_resumes(tmp_path):
    path = tmp_path / "a.h5"
    sim, calls = _flaky(PRIOR, stop_at=4)
    with pytest.raises(KeyboardInterrupt):
        simulate_to_hdf5(sim, 1000, path, seed=5, chunk_size=100, progress=False)
    assert not path.exists()
    with pytest.raises(StoreError, match=r"unfinished: 3 of 10 chunks.*run the same simulate command again"):
        load(path)
    summary = simulate_to_hdf5(sim, 1000, path, seed=5, chunk_size=100, progress=False)
    assert summary.chunks_resumed == 3
    clean = as_simulator(lambda theta, rng: theta + rng.normal(size=theta.shape), PRIOR, name="flaky", observable_shape=(2,))
    simulate_to_hdf5(clean, 1000, tmp_path / "b.h5", seed=5, chunk_size=100, progress=False)
    _assert_same(path, tmp_path / "b.h5")
    # A different unfinished run at the same path is refused, then discarded on request.
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        simulate_to_hdf5(sim, 1000, tmp_path / "c.h5", seed=5, chunk_size=100, progress=False)
    with pytest.raises(StoreError, match="unfinished run of a different training set.*seed"):
        simulate_to_hdf5(clean, 1000, tmp_path / "c.h5", seed=6, chunk_size=100, progress=False)
    simulate_to_hdf5(clean, 1000, tmp_path / "c.h5", seed=6, chunk_size=100, overwrite=True, progress=False)
    assert read_info(tmp_path / "c.h5")["seed"] == 6


def test_a_run_recorded_with_long_float32_decimals_resumes(tmp_path):
    # Runs recorded before priors were written with the shortest decimals hold
    # 0.10000000149011612 for a float32 bound of 0.1: the same prior, so the run resumes.
    path = tmp_path / "a.h5"
    prior = BoxUniform([0.1, 0.6], [0.5, 1.0])
    sim, _ = _flaky(prior, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        simulate_to_hdf5(sim, 500, path, seed=5, chunk_size=100, progress=False)
    manifest = path.with_name(path.name + ".partial") / "run.json"
    run = json.loads(manifest.read_text())
    recorded = json.loads(run["prior"])
    recorded["low"] = prior.low.tolist()  # float32 values as float64 decimals
    assert recorded["low"][0] == 0.10000000149011612
    run["prior"] = json.dumps(recorded, sort_keys=True)
    manifest.write_text(json.dumps(run))
    summary = simulate_to_hdf5(sim, 500, path, seed=5, chunk_size=100, progress=False)
    assert summary.chunks_resumed == 2
    # A prior that really differs is still refused.
    other, _ = _flaky(BoxUniform([0.1, 0.6], [0.5, 1.1]), stop_at=0)
    with pytest.raises(StoreError, match="prior"):
        simulate_to_hdf5(other, 500, path, seed=5, chunk_size=100, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "positive integer"),
        ({"n": -5}, "positive integer"),
        ({"n": 2.5}, "positive integer"),
        ({"chunk_size": 0}, "chunk size"),
        ({"workers": 0}, "workers"),
        ({"seed": -1}, "seed"),
        ({"compression": "lzf"}, "compression"),
        ({"prior": torch.distributions.Normal(0.0, 1.0)}, "prior must be one of sbi_gen.priors .*got Normal"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"n": 10, "seed": 0, **kwargs}
    n = args.pop("n")
    with pytest.raises(StoreError, match=match):
        simulate_to_hdf5(TOY, n, tmp_path / "a.h5", progress=False, **args)


def test_a_plain_function_is_not_taken_for_a_simulator(tmp_path):
    with pytest.raises(TypeError, match="function is not a simulator.*sbi_gen.as_simulator"):
        simulate_to_hdf5(lambda theta, rng: theta, 10, tmp_path / "a.h5", progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("seed", [2**63, 99999999999999999999999, -1, 1.5, "7", True, np.uint64(2**63)])
def test_a_seed_the_file_cannot_record_is_refused_before_anything_is_simulated(tmp_path, seed):
    """The seed is an int64 attribute: one out of range used to fail only when the finished
    file was written, after every simulation, leaving a .partial directory behind."""
    sim, calls = _flaky(PRIOR, stop_at=0)
    with pytest.raises(StoreError) as error:
        simulate_to_hdf5(sim, 100, tmp_path / "a.h5", seed=seed, chunk_size=10, progress=False)
    assert str(error.value) == f"the seed must be an integer from 0 to 9223372036854775807 (2**63 - 1), got {seed!r}"
    assert calls["n"] == 0 and list(tmp_path.iterdir()) == []


def test_the_largest_seed_is_recorded(tmp_path):
    assert MAX_SEED == 2**63 - 1
    simulate_to_hdf5(TOY, 20, tmp_path / "a.h5", seed=MAX_SEED, chunk_size=10, progress=False)
    assert read_info(tmp_path / "a.h5")["seed"] == MAX_SEED


def test_unwritable_paths(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        simulate_to_hdf5(TOY, 10, tmp_path / "missing" / "a.h5", seed=0, progress=False)
    with pytest.raises(StoreError, match="is a directory"):
        simulate_to_hdf5(TOY, 10, tmp_path, seed=0, progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="notes.txt is a file, not a directory"):
        simulate_to_hdf5(TOY, 10, tmp_path / "notes.txt" / "a.h5", seed=0, progress=False)
    # A read-only file system (root ignores permission bits, so use one the kernel refuses).
    with pytest.raises(StoreError, match="cannot write"):
        simulate_to_hdf5(TOY, 10, "/sys/a.h5", seed=0, progress=False)


def test_corrupt_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.h5"
    simulate_to_hdf5(TOY, 2000, good, seed=0, chunk_size=500, progress=False)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(StoreError, match="truncated|corrupt"):
        load(truncated)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        read_info(garbage)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(StoreError, match="not an sbi_gen training set"):
        load(foreign)
    with pytest.raises(StoreError, match="no such file"):
        load(tmp_path / "nothing.h5")


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.h5"
    simulate_to_hdf5(TOY, 40, path, seed=0, chunk_size=10, progress=False)
    return path


@pytest.mark.parametrize(
    "name, data, dtype",
    [
        ("x", np.array([["a", "b"]] * 40, dtype="S1"), "|S1"),
        ("theta", np.array([["a", "b"]] * 40, dtype=object), "|O"),  # variable-length strings
        ("x", np.ones((40, 2), dtype=complex), "<c16"),
        ("latents/z", np.array([[b"z"]] * 40), "|S1"),
        ("valid", np.ones(40, dtype=np.int64), "<i8"),  # would select rows by index, not by flag
    ],
)
def test_datasets_that_are_not_numbers_are_refused(tmp_path, good_file, name, data, dtype):
    """A copied training set with a dataset replaced by text used to load, and training then
    failed inside torch (can't convert np.ndarray of type numpy.bytes_)."""
    path = tmp_path / "strings.h5"
    path.write_bytes(good_file.read_bytes())
    with h5py.File(path, "r+") as f:
        if name in f:
            del f[name]
        f.create_dataset(name, data=data, dtype=h5py.string_dtype() if data.dtype == object else None)
    wanted = "booleans" if name == "valid" else "numbers"
    for reader in (read_info, load):
        with pytest.raises(StoreError) as error:
            reader(path)
        assert str(error.value) == f"{path}: {name} has dtype {dtype}, not {wanted}: not an sbi_gen training set"


@pytest.fixture(scope="module")
def moons_file(tmp_path_factory):
    import simulators

    path = tmp_path_factory.mktemp("moons") / "moons.h5"
    simulate_to_hdf5(simulators.get("two_moons"), 40, path, seed=0, chunk_size=10, progress=False)
    return path


def _edited(tmp_path, source, edit):
    path = tmp_path / "edited.h5"
    path.write_bytes(source.read_bytes())
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


@pytest.mark.parametrize("recorded", [[3], [2, 1], [], 3])
def test_x_rows_that_differ_from_the_recorded_observable_shape_are_refused(tmp_path, moons_file, recorded):
    """A hand-edited observable_shape used to be accepted: the file then described x wrongly."""
    path = _edited(tmp_path, moons_file, lambda f: f.attrs.__setitem__("observable_shape", recorded))
    wanted = tuple(recorded) if isinstance(recorded, list) else (recorded,)
    for reader in (read_info, load):
        with pytest.raises(StoreError) as error:
            reader(path)
        assert str(error.value) == f"{path} is inconsistent: x has rows of shape (2,), the file says observable_shape {wanted}"
    assert read_info(moons_file)["observable_shape"] == [2]  # the untouched file still reads


def _replace(f, name, data):
    del f[name]
    f[name] = data


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda f: f.attrs.__setitem__("parameter_names", json.dumps(["a", "b", "c"])),
         "theta has shape (40, 2), the file says 3 parameters (a, b, c)"),
        (lambda f: _replace(f, "theta", np.zeros((40, 3))), "theta has shape (40, 3), the file says 2 parameters (theta_1, theta_2)"),
        (lambda f: _replace(f, "theta", np.zeros(40)), "theta has shape (40,), the file says 2 parameters (theta_1, theta_2)"),
        (lambda f: (f.attrs.__delitem__("parameter_names"), _replace(f, "theta", np.zeros(40))),
         "theta has shape (40,), not (simulations, parameters)"),
    ],
)
def test_theta_columns_that_differ_from_the_parameter_names_are_refused(tmp_path, moons_file, edit, message):
    path = _edited(tmp_path, moons_file, edit)
    for reader in (read_info, load):
        with pytest.raises(StoreError) as error:
            reader(path)
        assert str(error.value) == f"{path} is inconsistent: {message}"


def test_metadata_that_is_not_json_is_refused(tmp_path, moons_file):
    path = _edited(tmp_path, moons_file, lambda f: f.attrs.__setitem__("parameter_names", "[theta_1, theta_2"))
    with pytest.raises(StoreError) as error:
        read_info(path)
    assert str(error.value) == f"{path}: the parameter_names attribute is not valid JSON (Expecting value)"


def test_a_simulator_returning_text_is_refused_at_its_first_chunk(tmp_path):
    """Compressed runs kept any dtype, so a run of text finished only to be refused when loaded."""
    calls = {"n": 0}

    class TextSimulator:  # the protocol, duck-typed: as_simulator's wrapper refuses text itself
        name, version, prior = "text", "0", PRIOR
        parameter_names, observable_shape = ["a", "b"], (2,)

        def simulate(self, theta, rng):
            calls["n"] += 1
            return {"x": np.array([["a", "b"]] * len(theta))}

    sim = TextSimulator()
    for compression in ("gzip", None):
        calls["n"] = 0
        with pytest.raises(StoreError) as error:
            simulate_to_hdf5(sim, 1000, tmp_path / f"{compression}.h5", seed=0, chunk_size=100, compression=compression, progress=False)
        assert str(error.value) == "simulator 'text': x has dtype <U1; the store keeps numbers and booleans only"
        assert calls["n"] <= 2 and not (tmp_path / f"{compression}.h5").exists()


def test_load_slices_rows_and_split(tmp_path):
    path = tmp_path / "a.h5"
    simulate_to_hdf5(TOY, 1000, path, seed=3, chunk_size=100, progress=False)
    full = load(path, valid_only=False)
    part = load(path, rows=slice(100, 200), valid_only=False)
    assert np.array_equal(part.x.numpy(), full.x.numpy()[100:200], equal_nan=True)
    picked = load(path, rows=[3, 10, 999], valid_only=False)
    assert np.array_equal(picked.rows, [3, 10, 999])
    with pytest.raises(StoreError, match="sorted"):
        load(path, rows=[5, 3])
    train, val = train_val_split(1000, 0.1, seed=0)
    assert len(val) == 100 and len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 1000
    assert np.array_equal(val, train_val_split(1000, 0.1, seed=0)[1])


_DRIVER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from sbi_gen.priors import BoxUniform
    from sbi_gen.simulate import as_simulator
    from sbi_gen.store import simulate_to_hdf5

    def slow(theta, rng):
        time.sleep(0.02)  # an expensive simulator: the kill lands mid-run
        return theta * 2 + rng.normal(size=theta.shape)

    sim = as_simulator(slow, BoxUniform([0.0, 0.0], [1.0, 1.0]), name="slow", observable_shape=(2,))
    compression = None if sys.argv[3] == "none" else sys.argv[3]
    simulate_to_hdf5(sim, 6000, sys.argv[1], seed=9, chunk_size=50, workers=int(sys.argv[2]), compression=compression,
                     progress=False)
    """
)


def chunks_done(partial):
    """Finished chunks of an unfinished run: chunk files (compressed) or journal lines (in place)."""
    if not partial.is_dir():
        return 0
    try:
        journal = (partial / "done.jsonl").read_text().count("\n")
    except FileNotFoundError:
        journal = 0
    return len(list(partial.glob("chunk-*.bin"))) + journal


def _wait_for_chunks(proc, partial, target, timeout=120.0):
    """Wait until ``target`` chunks are done; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if chunks_done(partial) >= target:
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("workers, compression", [(1, "gzip"), (2, "gzip"), (1, "none"), (2, "none")])
def test_kill_minus_9_at_random_points_then_resume_equals_uninterrupted(tmp_path, workers, compression):
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    path = tmp_path / "killed.h5"
    rng = np.random.default_rng(workers)
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, str(driver), str(path), str(workers), compression], start_new_session=True)
        # Kill at a random point of progress (not of wall time, so a busy machine changes nothing).
        if _wait_for_chunks(proc, tmp_path / "killed.h5.partial", int(rng.integers(1, 110))):
            time.sleep(rng.uniform(0, 0.05))
            os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: workers die too
            kills += 1
        proc.wait()
        # Whatever the moment of the kill, the path never holds an unfinished file.
        if path.exists():
            read_info(path)
    assert kills >= 2
    subprocess.run([sys.executable, str(driver), str(path), str(workers), compression], check=True)
    reference = tmp_path / "reference.h5"
    subprocess.run([sys.executable, str(driver), str(reference), "1", "gzip"], check=True)
    _assert_same(path, reference)
    assert not (tmp_path / "killed.h5.partial").exists()


def _interrupted_in_place_run(tmp_path, name, stop_at):
    """An uncompressed run stopped by Ctrl-C during chunk ``stop_at`` (1-based)."""
    sim, _ = _flaky(PRIOR, stop_at)
    with pytest.raises(KeyboardInterrupt):
        simulate_to_hdf5(sim, 1000, tmp_path / name, seed=5, chunk_size=100, compression=None, progress=False)
    clean = as_simulator(lambda theta, rng: theta + rng.normal(size=theta.shape), PRIOR, name="flaky", observable_shape=(2,))
    return sim, clean


def test_in_place_run_resumes_keeps_finished_chunks_and_says_it_is_unfinished(tmp_path):
    sim, clean = _interrupted_in_place_run(tmp_path, "a.h5", stop_at=5)
    partial = tmp_path / "a.h5.partial"
    # The chunk being written when Ctrl-C came is kept: 4 chunks done.
    assert chunks_done(partial) == 4
    with pytest.raises(StoreError, match=r"unfinished: 4 of 10 chunks"):
        read_info(tmp_path / "a.h5")
    # The file being filled is an HDF5 file that says it is not finished.
    (data,) = partial.glob("data-*.h5")
    with h5py.File(data) as f:
        assert not f.attrs["complete"]
    summary = simulate_to_hdf5(sim, 1000, tmp_path / "a.h5", seed=5, chunk_size=100, compression=None, progress=False)
    assert summary.chunks_resumed == 4
    simulate_to_hdf5(clean, 1000, tmp_path / "b.h5", seed=5, chunk_size=100, progress=False)
    _assert_same(tmp_path / "a.h5", tmp_path / "b.h5")
    assert not partial.exists()


@pytest.mark.parametrize("damage", ["superblock", "missing file", "torn journal line"])
def test_in_place_run_recovers_from_a_damaged_partial_run(tmp_path, damage):
    sim, clean = _interrupted_in_place_run(tmp_path, "a.h5", stop_at=6)
    partial = tmp_path / "a.h5.partial"
    (data,) = partial.glob("data-*.h5")
    if damage == "superblock":
        # What a kill during the final metadata write can leave: the file no longer opens, yet
        # the finished chunks' rows are intact at their recorded offsets and are carried over.
        with open(data, "r+b") as f:
            f.write(bytes(512))
        expected_resumed = 5
    elif damage == "missing file":
        data.unlink()
        expected_resumed = 0
    else:
        with open(partial / "done.jsonl", "a") as f:
            f.write('{"index": 7, "n_va')  # a kill in the middle of appending
        expected_resumed = 5
    summary = simulate_to_hdf5(sim, 1000, tmp_path / "a.h5", seed=5, chunk_size=100, compression=None, progress=False)
    assert summary.chunks_resumed == expected_resumed
    simulate_to_hdf5(clean, 1000, tmp_path / "b.h5", seed=5, chunk_size=100, progress=False)
    _assert_same(tmp_path / "a.h5", tmp_path / "b.h5")


class _Drifting:
    """A protocol simulator whose latent grows a column after two chunks (a bug to report)."""

    name = "drifting"
    parameter_names = ["a", "b"]
    observable_shape = (2,)
    prior = PRIOR

    def __init__(self):
        self.calls = 0

    def simulate(self, theta, rng):
        self.calls += 1
        return {"x": theta, "latents": {"z": np.zeros((len(theta), 3 if self.calls < 3 else 4))}}


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_a_run_refuses_chunks_that_change_shape(tmp_path, compression):
    """Compressed runs used to copy such a chunk's bytes in as they were: a file of garbage rows."""
    with pytest.raises(StoreError, match=r"drifting.*chunk 2 returned latents/z as float64 rows of shape \(4,\).*\(3,\)"):
        simulate_to_hdf5(_Drifting(), 500, tmp_path / "a.h5", seed=0, chunk_size=100, compression=compression, progress=False)
    assert not (tmp_path / "a.h5").exists()


def test_damaged_chunk_files_of_a_compressed_run_are_simulated_again(tmp_path):
    sim, _ = _flaky(PRIOR, stop_at=5)
    with pytest.raises(KeyboardInterrupt):
        simulate_to_hdf5(sim, 1000, tmp_path / "a.h5", seed=5, chunk_size=100, progress=False)
    first, second, *_ = sorted((tmp_path / "a.h5.partial").glob("chunk-*.bin"))
    first.write_bytes(first.read_bytes()[:-10])  # truncated (a disk that filled up)
    second.write_bytes(b"garbage")
    summary = simulate_to_hdf5(sim, 1000, tmp_path / "a.h5", seed=5, chunk_size=100, progress=False)
    assert summary.chunks_resumed == 2
    clean = as_simulator(lambda theta, rng: theta + rng.normal(size=theta.shape), PRIOR, name="flaky", observable_shape=(2,))
    simulate_to_hdf5(clean, 1000, tmp_path / "b.h5", seed=5, chunk_size=100, progress=False)
    _assert_same(tmp_path / "a.h5", tmp_path / "b.h5")


def test_a_second_process_on_the_same_path_is_refused_while_the_first_runs(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    path = tmp_path / "busy.h5"
    proc = subprocess.Popen([sys.executable, str(driver), str(path), "1", "none"], start_new_session=True)
    try:
        assert _wait_for_chunks(proc, tmp_path / "busy.h5.partial", 2)
        sim = as_simulator(lambda theta, rng: theta, BoxUniform([0.0, 0.0], [1.0, 1.0]), name="slow", observable_shape=(2,))
        with pytest.raises(StoreError, match="another process is simulating into .*busy.h5 right now"):
            simulate_to_hdf5(sim, 6000, path, seed=9, chunk_size=50, compression=None, progress=False)
    finally:
        assert proc.wait(timeout=300) == 0
    # The first run finished undisturbed, and its lock is gone with it.
    assert read_info(path)["n_valid"] == 6000 and not (tmp_path / "busy.h5.lock").exists()


def test_load_takes_a_boolean_mask_and_refuses_rows_it_would_misread(tmp_path):
    path = tmp_path / "a.h5"
    simulate_to_hdf5(TOY, 6, path, seed=3, progress=False)
    full = load(path, valid_only=False)
    mask = np.array([False, True, False, True, True, False])
    picked = load(path, rows=mask, valid_only=False)
    assert np.array_equal(picked.rows, [1, 3, 4])
    assert np.array_equal(picked.theta.numpy(), full.theta.numpy()[mask])
    with pytest.raises(StoreError, match=r"boolean row mask needs one entry per row \(6\).*got shape \(2,\)"):
        load(path, rows=[False, True])
    with pytest.raises(StoreError, match="row indices must be integers .*got float64"):
        load(path, rows=[1.7, 2.2])


@pytest.mark.parametrize("dtype", ["float32", torch.int64, torch.bool, np.float32])
def test_load_refuses_a_dtype_that_is_not_a_floating_torch_dtype(tmp_path, dtype):
    path = tmp_path / "a.h5"
    simulate_to_hdf5(TOY, 4, path, seed=3, progress=False)
    with pytest.raises(StoreError, match=r"dtype must be a floating torch dtype such as torch.float32, got"):
        load(path, dtype=dtype)
    assert load(path, dtype=torch.float64, valid_only=False).theta.dtype == torch.float64


@pytest.mark.parametrize("n, fraction, train, val", [(10, 0.96, 0, 10), (2, 0.9, 0, 2)])
def test_a_split_that_leaves_no_training_rows_is_refused(n, fraction, train, val):
    with pytest.raises(ValueError, match=rf"validation fraction of {fraction} of {n} rows leaves {train} for training and {val} for validation"):
        train_val_split(n, fraction)
    assert [len(part) for part in train_val_split(2, 0.5)] == [1, 1]
