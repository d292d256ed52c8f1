"""Simulation on a real Dask cluster: same file as a serial run, a worker or the client killed mid-run, the CLI."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import simulators
from sbi_gen.dask_executor import DaskError, dask_client
from sbi_gen.priors import BoxUniform
from sbi_gen.simulate import as_simulator
from sbi_gen.store import StoreError, read_info, simulate_to_hdf5
from tests.dask_helpers import SlowNoisy, always_fails, crashes_its_process, fragile
from tests.test_store import chunks_done

ROOT = Path(__file__).resolve().parent.parent
PRIOR = BoxUniform([0.0, 0.0], [1.0, 1.0], names=["a", "b"])
# Chunks of the slow simulator: 0.2 s each, 24 of them, so a kill lands while both workers are busy.
SLOW_N, SLOW_CHUNK, SLOW_DELAY = 2400, 100, 0.2


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of two single-threaded worker processes, shared by the tests of this module
    (startup costs seconds), started as ``--dask-local 2`` starts it."""
    environment = dict(os.environ)
    with dask_client(local_workers=2) as client:
        assert client.cluster is not None and len(client.cluster.workers) == 2
        assert set(client.nthreads().values()) == {1}
        client.wait_for_workers(2, timeout=60)
        yield client
    # The nannies ran in this process and set OMP_NUM_THREADS & co. here; later tests must not inherit them.
    assert dict(os.environ) == environment


def _contents(path):
    """Every dataset and every root attribute of an HDF5 file."""
    datasets = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: datasets.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        attrs = {key: f.attrs[key] for key in f.attrs}
    return datasets, attrs


def _assert_same_file(a, b):
    """Same datasets (dtype, shape and values, NaN where NaN) and the same attributes."""
    (da, aa), (db, ab) = _contents(a), _contents(b)
    assert sorted(da) == sorted(db)
    for key in da:
        assert da[key].dtype == db[key].dtype and da[key].shape == db[key].shape, key
        assert np.array_equal(da[key], db[key], equal_nan=da[key].dtype.kind == "f"), key
    assert sorted(aa) == sorted(ab)
    for key in aa:
        assert np.array_equal(aa[key], ab[key]), key


def _wait_for_shards(partial, target, alive, timeout=90.0):
    """Wait until ``target`` chunk files exist in ``partial``; False if ``alive()`` turns false first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        if chunks_done(partial) >= target:
            return True
        time.sleep(0.01)
    return False


def _reruns(client, prefix):
    """How many tasks whose key starts with ``prefix`` the scheduler sent to a worker more than once."""

    def count(dask_scheduler):
        starts = {}
        for entry in dask_scheduler.transition_log:
            if str(entry.key).startswith(prefix) and entry.finish == "processing":
                starts[entry.key] = starts.get(entry.key, 0) + 1
        return sum(n > 1 for n in starts.values())

    return client.run_on_scheduler(count)


@pytest.mark.timeout(180)
def test_dask_file_equals_serial_file(client, tmp_path):
    cases = [
        (simulators.get("particle"), 2000, 250),  # latents and augmented datasets
        (simulators.get("cosmology"), 300, 50),  # 2-D maps
        (as_simulator(fragile, PRIOR, name="fragile", observable_shape=(2,)), 1000, 100),  # failed rows, first error
    ]
    for number, (sim, n, chunk_size) in enumerate(cases):
        serial = tmp_path / f"serial-{number}.h5"
        simulate_to_hdf5(sim, n, serial, seed=7, chunk_size=chunk_size, progress=False)
        on_dask = tmp_path / f"dask-{number}.h5"
        # The address for one case, the client object for the others: both ways of naming a cluster.
        scheduler = client.scheduler.address if number == 0 else client
        summary = simulate_to_hdf5(sim, n, on_dask, seed=7, chunk_size=chunk_size, progress=False,
                                   executor="dask", scheduler=scheduler)
        assert summary.n_chunks == -(-n // chunk_size) and summary.chunks_resumed == 0
        _assert_same_file(serial, on_dask)
        assert not on_dask.with_name(on_dask.name + ".partial").exists()
        # Uncompressed: the cluster returns the arrays and this process writes them in place.
        serial_plain, plain = tmp_path / f"serial-plain-{number}.h5", tmp_path / f"dask-plain-{number}.h5"
        simulate_to_hdf5(sim, n, serial_plain, seed=7, chunk_size=chunk_size, progress=False, compression=None)
        simulate_to_hdf5(sim, n, plain, seed=7, chunk_size=chunk_size, progress=False, compression=None,
                         executor="dask", scheduler=client)
        _assert_same_file(serial_plain, plain)
    assert "FloatingPointError: negative variance" in read_info(tmp_path / "dask-2.h5")["first_error"]
    assert read_info(tmp_path / "dask-2.h5")["n_failed"] > 0


@pytest.mark.timeout(180)
def test_worker_killed_mid_run_loses_nothing(client, tmp_path):
    path = tmp_path / "killed-worker.h5"
    pids = client.run(os.getpid)
    assert len(pids) == 2
    outcome = {}

    def run():
        try:
            outcome["summary"] = simulate_to_hdf5(SlowNoisy(SLOW_DELAY), SLOW_N, path, seed=21, chunk_size=SLOW_CHUNK,
                                                  progress=False, executor="dask", scheduler=client)
        except BaseException as error:  # reported by the main thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    partial = tmp_path / "killed-worker.h5.partial"
    assert _wait_for_shards(partial, 4, thread.is_alive), outcome
    victim = sorted(pids.values())[0]
    os.kill(victim, signal.SIGKILL)  # both workers are busy: this one dies holding a chunk
    shards_at_kill = len(list(partial.glob("chunk-*.bin")))
    thread.join(timeout=150)
    assert not thread.is_alive(), "the run did not finish after a worker was killed"
    assert "error" not in outcome, outcome.get("error")
    assert shards_at_kill < SLOW_N // SLOW_CHUNK  # the kill really was mid-run
    assert victim not in client.run(os.getpid).values()  # it really died (its nanny starts a fresh one)
    # The scheduler sent the dead worker's chunk(s) to a worker again...
    assert _reruns(client, "sbi-gen-chunk-") >= 1
    # ...and the file holds every chunk exactly once: the same as a serial run without delay.
    reference = tmp_path / "reference.h5"
    simulate_to_hdf5(SlowNoisy(0.0), SLOW_N, reference, seed=21, chunk_size=SLOW_CHUNK, progress=False)
    _assert_same_file(path, reference)
    assert outcome["summary"].n_simulations == SLOW_N


_CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys
    from sbi_gen.store import simulate_to_hdf5
    from tests.dask_helpers import SlowNoisy

    simulate_to_hdf5(SlowNoisy(float(sys.argv[3])), int(sys.argv[4]), sys.argv[1], seed=33, chunk_size=int(sys.argv[5]),
                     progress=False, executor="dask", scheduler=sys.argv[2])
    """
)


@pytest.mark.timeout(180)
def test_client_killed_then_resumed_equals_uninterrupted(client, tmp_path):
    path = tmp_path / "killed-client.h5"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLIENT_SCRIPT, str(path), client.scheduler.address, str(SLOW_DELAY), str(SLOW_N), str(SLOW_CHUNK)],
        cwd=ROOT, start_new_session=True,
    )
    try:
        reached = _wait_for_shards(tmp_path / "killed-client.h5.partial", 3, lambda: proc.poll() is None)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert reached, f"the client exited with {proc.returncode} before writing 3 chunks"
    assert not path.exists()
    with pytest.raises(StoreError, match="unfinished"):
        read_info(path)
    done = len(list((tmp_path / "killed-client.h5.partial").glob("chunk-*.bin")))
    assert 3 <= done < SLOW_N // SLOW_CHUNK
    # Resume from this process, on the same cluster: only the missing chunks are simulated.
    summary = simulate_to_hdf5(SlowNoisy(SLOW_DELAY), SLOW_N, path, seed=33, chunk_size=SLOW_CHUNK, progress=False,
                               executor="dask", scheduler=client)
    assert summary.chunks_resumed == done
    reference = tmp_path / "reference.h5"
    simulate_to_hdf5(SlowNoisy(0.0), SLOW_N, reference, seed=33, chunk_size=SLOW_CHUNK, progress=False)
    _assert_same_file(path, reference)


@pytest.mark.timeout(60)
def test_task_error_is_raised_and_finished_chunks_kept(client, tmp_path):
    sim = as_simulator(always_fails, PRIOR, name="broken", observable_shape=(2,))
    with pytest.raises(RuntimeError, match="failed for every parameter in a chunk.*never works"):
        simulate_to_hdf5(sim, 300, tmp_path / "broken.h5", seed=0, chunk_size=100, progress=False,
                         executor="dask", scheduler=client)
    assert not (tmp_path / "broken.h5").exists()
    assert not list(tmp_path.glob("broken.h5.tmp-*"))


@pytest.mark.timeout(90)
def test_task_that_kills_its_workers_stops_the_run_with_one_line(client, tmp_path):
    def set_allowed_failures(dask_scheduler, value):
        previous, dask_scheduler.allowed_failures = dask_scheduler.allowed_failures, value
        return previous

    # Give up on the first lost worker, not the fourth: each loss costs a worker restart.
    previous = client.run_on_scheduler(set_allowed_failures, value=0)
    try:
        sim = as_simulator(crashes_its_process, PRIOR, name="crashing", observable_shape=(2,))
        with pytest.raises(DaskError, match="kept killing the Dask workers that ran it.*out of memory, or a crash"):
            simulate_to_hdf5(sim, 100, tmp_path / "crash.h5", seed=0, chunk_size=100, progress=False,
                             executor="dask", scheduler=client)
    finally:
        client.run_on_scheduler(set_allowed_failures, value=previous)
    assert not (tmp_path / "crash.h5").exists()


def _sbi_gen(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "sbi_gen.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.timeout(180)
def test_cli_dask_local_equals_serial(tmp_path):
    path = tmp_path / "moons.h5"
    proc = _sbi_gen("simulate", "two_moons", "--n", 1500, "--out", path, "--seed", 4, "--chunk-size", 250,
                    "--dask-local", 2, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "1,500 (1,500 valid" in proc.stdout and "6 (0 resumed" in proc.stdout
    reference = tmp_path / "reference.h5"
    simulate_to_hdf5(simulators.get("two_moons"), 1500, reference, seed=4, chunk_size=250, progress=False)
    _assert_same_file(path, reference)


def _closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _one_line_error(proc):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sbi-gen: error: "), proc.stderr
    return lines[0]


@pytest.mark.timeout(60)
def test_cli_unreachable_scheduler_is_one_line_and_leaves_nothing(tmp_path):
    address = f"tcp://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    proc = _sbi_gen("simulate", "two_moons", "--n", 100, "--out", tmp_path / "a.h5", "--seed", 0,
                    "--scheduler", address, "--connect-timeout", 1)
    assert time.monotonic() - started < 30
    assert f"cannot reach the Dask scheduler at {address} within 1 s" in _one_line_error(proc)
    assert list(tmp_path.iterdir()) == []  # no unfinished run left for a mistyped address


@pytest.mark.parametrize("address, match", [("no-port-here", "bad Dask scheduler address 'no-port-here'"),
                                            ("tcp://host.invalid:8786", "bad Dask scheduler address")])
def test_malformed_scheduler_address_fails_at_once(tmp_path, address, match):
    with pytest.raises(DaskError, match=match):
        simulate_to_hdf5(SlowNoisy(), 10, tmp_path / "a.h5", seed=0, progress=False, executor="dask", scheduler=address)
    assert list(tmp_path.iterdir()) == []


_WITHOUT_DASK = textwrap.dedent(
    """
    import sys
    from sbi_gen.cli import main

    # The local executor works without dask and never imports it.
    assert main(["simulate", "two_moons", "--n", "100", "--out", sys.argv[1], "--seed", "0", "--quiet"]) == 0
    assert "dask" not in sys.modules and "distributed" not in sys.modules, "the local executor imported dask"
    sys.modules["dask"] = sys.modules["distributed"] = None  # as if not installed: importing them fails
    sys.exit(main(["simulate", "two_moons", "--n", "100", "--out", sys.argv[2], "--seed", "0", "--dask-local", "2"]))
    """
)


@pytest.mark.timeout(60)
def test_missing_dask_is_one_line_naming_the_install(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_DASK, str(tmp_path / "local.h5"), str(tmp_path / "dask.h5")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "pip install sbi_gen[dask]" in _one_line_error(proc)
    assert read_info(tmp_path / "local.h5")["n_simulations"] == 100
    assert not (tmp_path / "dask.h5").exists() and not (tmp_path / "dask.h5.partial").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"executor": "spark"}, "executor must be 'local' or 'dask'"),
        ({"scheduler": "tcp://127.0.0.1:8786"}, "needs executor='dask'"),
        ({"dask_local_workers": 2}, "needs executor='dask'"),
        ({"executor": "dask", "workers": 2}, "counts local processes"),
        ({"executor": "dask", "scheduler": "tcp://127.0.0.1:8786", "dask_local_workers": 2}, "not both"),
        ({"executor": "dask", "dask_local_workers": 0}, "positive integer"),
        ({"executor": "dask", "scheduler": "tcp://127.0.0.1:8786", "connect_timeout": 0}, "timeout must be positive"),
    ],
)
def test_bad_executor_arguments(tmp_path, kwargs, match):
    with pytest.raises(StoreError, match=match):
        simulate_to_hdf5(SlowNoisy(), 10, tmp_path / "a.h5", seed=0, progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


_NO_MAIN_GUARD = textwrap.dedent(
    """
    import simulators
    from sbi_gen.store import simulate_to_hdf5

    simulate_to_hdf5(simulators.get("two_moons"), 100, "x.h5", seed=0, progress=False, executor="dask", dask_local_workers=1)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_local_cluster_from_a_script_without_main_guard_says_so(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(_NO_MAIN_GUARD)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=110, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert "could not start a local Dask cluster" in proc.stderr and 'if __name__ == "__main__":' in proc.stderr
