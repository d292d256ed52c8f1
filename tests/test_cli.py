"""The command line through real subprocesses: outputs, one-line errors, kill -9 and resume."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from sbi_gen.store import load, read_info
from tests.test_store import _wait_for_chunks

ROOT = Path(__file__).resolve().parent.parent


def sbi_gen(*args, check=True, timeout=300):
    proc = subprocess.run(
        [sys.executable, "-m", "sbi_gen.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sbi-gen {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 or lines[-1].startswith("sbi-gen") or "error:" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, proc.stderr)


def test_simulators_lists_every_registered_simulator():
    out = sbi_gen("simulators").stdout
    for name in ("particle", "cosmology", "gaussian_linear", "two_moons", "slcp"):
        assert name in out
    assert "m_X [GeV]" in out


def test_simulate_then_info(tmp_path):
    path = tmp_path / "moons.h5"
    out = sbi_gen("simulate", "two_moons", "--n", 3000, "--out", path, "--seed", 4, "--workers", 2, "--chunk-size", 500).stdout
    assert "3,000 (3,000 valid" in out and "simulations/s" in out
    info = sbi_gen("info", path).stdout
    assert "two_moons" in info and "seed            4" in info and "(3000, 2)" in info
    as_json = json.loads(sbi_gen("info", path, "--json").stdout)
    assert as_json["n_simulations"] == 3000
    again = sbi_gen("simulate", "two_moons", "--n", 3000, "--out", path, "--seed", 4, "--chunk-size", 500).stdout
    assert "already complete" in again
    # Uncompressed (written in place): the same simulations, an uncompressed file.
    plain = tmp_path / "plain.h5"
    sbi_gen("simulate", "two_moons", "--n", 3000, "--out", plain, "--seed", 4, "--workers", 2, "--chunk-size", 500,
            "--compression", "none", "--quiet")
    assert json.loads(sbi_gen("info", plain, "--json").stdout)["compression"] == "none"
    with h5py.File(path) as a, h5py.File(plain) as b:
        assert b["x"].compression is None
        for key in ("theta", "x", "valid"):
            assert np.array_equal(a[key][:], b[key][:]), key


def test_simulate_errors_are_one_line(tmp_path):
    assert_one_line_error(sbi_gen("simulate", "nope", "--n", 10, "--out", tmp_path / "a.h5", check=False), "unknown simulator 'nope'", "particle")
    proc = sbi_gen("simulate", "two_moons", "--n", 0, "--out", tmp_path / "a.h5", check=False)
    # One line, not argparse's usage block.
    assert proc.stderr.strip() == "sbi-gen simulate: error: argument --n: expected a positive integer, got 0 (see sbi-gen simulate --help)"
    assert_one_line_error(sbi_gen("simulate", "two_moons", "--n", -4, "--out", tmp_path / "a.h5", check=False), "positive integer")
    assert_one_line_error(sbi_gen("simulate", "two_moons", "--n", 10, "--out", tmp_path / "no" / "a.h5", check=False), "does not exist")
    assert_one_line_error(sbi_gen("simulate", "two_moons", "--n", 10, "--out", "/sys/a.h5", check=False), "cannot write")
    assert_one_line_error(
        sbi_gen("simulate", "cosmology", "--n", 10, "--out", tmp_path / "a.h5", "--config", '{"n_pixels": 8}', check=False),
        "bad --config",
    )
    sbi_gen("simulate", "two_moons", "--n", 100, "--out", tmp_path / "b.h5", "--seed", 1)
    assert_one_line_error(
        sbi_gen("simulate", "two_moons", "--n", 100, "--out", tmp_path / "b.h5", "--seed", 2, check=False),
        "different training set",
        "--overwrite",
    )
    assert sbi_gen("simulate", "two_moons", "--n", 100, "--out", tmp_path / "b.h5", "--seed", 2, "--overwrite").returncode == 0


@pytest.mark.parametrize(
    "simulator, config, message",
    [
        ("cosmology", '{"lognormal": "yes"}', 'lognormal must be true or false, got "yes"'),  # was taken as true
        ("cosmology", '{"n_pix": "big"}', 'n_pix must be an integer, got "big"'),
        ("cosmology", '{"field_deg": "big"}', 'field_deg must be a number or null, got "big"'),
        ("cosmology", '{"grid": "big"}', "no option 'grid'; its options are n_pix, field_deg, lognormal, noise,"),
        ("cosmology", '{"n_pix": 1}', "n_pix must be an integer >= 2, got 1"),  # the simulator's own check
        ("particle", '{"mass_width": "wide"}', 'mass_width must be a number, got "wide"'),
        ("particle", '{"efficiency": [1]}', "efficiency must be a number, got [1]"),
        ("particle", '{"k_max": 2.5}', "k_max must be an integer, got 2.5"),
    ],
)
def test_simulator_options_of_the_wrong_type_are_one_clear_line(tmp_path, simulator, config, message):
    """A value of the wrong type used to surface as the simulator's TypeError (must be real
    number, not str), some other error naming no option, or no error at all."""
    proc = sbi_gen("simulate", simulator, "--n", 10, "--out", tmp_path / "a.h5", "--config", config, check=False)
    assert_one_line_error(proc, f"sbi-gen: error: bad --config for simulator {simulator!r}: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "a.h5").exists()


def test_info_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert_one_line_error(sbi_gen("info", bad, check=False), "not a readable HDF5 file")
    assert_one_line_error(sbi_gen("info", tmp_path / "missing.h5", check=False), "no such file")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(3)
    assert_one_line_error(sbi_gen("info", foreign, check=False), "not an sbi_gen training set")


def test_kill_minus_9_of_the_cli_with_workers_then_resume(tmp_path):
    path = tmp_path / "maps.h5"
    args = ["simulate", "cosmology", "--n", 30000, "--out", path, "--seed", 7, "--workers", 2, "--chunk-size", 250,
            "--config", '{"n_pix": 16}', "--quiet"]
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "sbi_gen.cli", *map(str, args)], cwd=ROOT, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if _wait_for_chunks(proc, tmp_path / "maps.h5.partial", int(rng.integers(1, 110))):
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        if not path.exists():
            # Killed after the run started: `info` says it is unfinished; before: that there is no file.
            started = (tmp_path / "maps.h5.partial" / "run.json").exists()
            expected = ("unfinished", "run the same simulate command again") if started else ("no such file",)
            assert_one_line_error(sbi_gen("info", path, check=False), *expected)
    assert kills >= 1
    out = sbi_gen(*args).stdout
    assert "resumed from an earlier run" in out
    reference = tmp_path / "reference.h5"
    sbi_gen(*[a if a != path else reference for a in args[:-5]], "--workers", 1, "--chunk-size", 250, "--config", '{"n_pix": 16}', "--quiet")
    with h5py.File(path) as a, h5py.File(reference) as b:
        for key in ("theta", "x", "valid", "latents/kappa"):
            assert np.array_equal(a[key][:], b[key][:]), key
    assert read_info(path)["n_valid"] == 30000


def test_train_and_sample_end_to_end(tmp_path):
    data = tmp_path / "moons.h5"
    sbi_gen("simulate", "two_moons", "--n", 2000, "--out", data, "--seed", 0, "--quiet")
    model = tmp_path / "model"
    out = sbi_gen("train", data, "--method", "npe", "--estimator", "nsf", "--out", model, "--max-epochs", 3,
                  "--min-delta", 0.001, "--estimator-kwargs", '{"transforms": 2, "hidden_features": [32, 32]}',
                  "--quiet").stdout
    assert "model saved" in out and (model / "config.json").exists() and (model / "weights.pt").exists()
    samples = tmp_path / "samples.h5"
    out = sbi_gen("sample", model, "--obs", ROOT / "data/observations/two_moons.h5", "--index", 1, "--n", 500, "--out", samples).stdout
    assert "68% interval" in out and "theta_1" in out
    with h5py.File(samples) as f:
        assert f["samples"].shape == (500, 2)
        assert json.loads(f.attrs["parameter_names"]) == ["theta_1", "theta_2"]
        assert np.all(np.abs(f["samples"][:]) <= 1)  # inside the prior box
    x_obs = tmp_path / "x.npy"
    np.save(x_obs, np.array([0.1, 0.2]))
    assert sbi_gen("sample", model, "--obs", x_obs, "--n", 10, "--out", tmp_path / "s2.h5").returncode == 0

    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros(3))
    assert_one_line_error(sbi_gen("sample", model, "--obs", wrong, "--n", 10, "--out", tmp_path / "s.h5", check=False),
                          "x_obs has shape (3,)", "(2,)")
    assert_one_line_error(sbi_gen("sample", tmp_path / "nomodel", "--obs", x_obs, "--out", tmp_path / "s.h5", check=False),
                          "no such checkpoint")
    assert_one_line_error(sbi_gen("sample", model, "--obs", ROOT / "data/observations/two_moons.h5", "--index", 9,
                                  "--out", tmp_path / "s.h5", check=False), "out of range")
    assert_one_line_error(sbi_gen("train", data, "--estimator", "gan", "--out", tmp_path / "m", check=False),
                          "unknown estimator 'gan'")
    assert_one_line_error(sbi_gen("train", tmp_path / "none.h5", "--out", tmp_path / "m", check=False), "no such file")
    assert_one_line_error(sbi_gen("train", data, "--min-delta", -0.1, "--out", tmp_path / "m", check=False),
                          "expected a non-negative number, got -0.1")
    assert_one_line_error(sbi_gen("train", data, "--learning-rate", "inf", "--out", tmp_path / "m", check=False),
                          "expected a finite positive number, got inf")
    assert_one_line_error(sbi_gen("train", data, "--seed", 2**64, "--out", tmp_path / "m", check=False),
                          f"expected a seed from 0 to {2**63 - 1}")
    assert not (tmp_path / "m").exists()  # nothing is made by a run that fails before its first epoch
    _observation_and_output_errors(tmp_path, data, model, samples)


def _observation_and_output_errors(tmp_path, data, model, samples):
    """What `sample` and `train` refuse, in one line, and what they leave untouched."""
    before = data.read_bytes()
    assert_one_line_error(sbi_gen("sample", model, "--obs", samples, "--out", data, check=False),
                          f"{data} exists and was not written by `sbi-gen sample`")
    assert_one_line_error(sbi_gen("sample", model, "--obs", data, "--out", data, check=False), "is one of this command's inputs")
    assert data.read_bytes() == before
    sbi_gen("sample", model, "--obs", data, "--index", 5, "--n", 7, "--out", samples)  # an earlier samples file is replaced
    with h5py.File(samples) as f:
        assert f["samples"].shape == (7, 2)
    assert_one_line_error(sbi_gen("sample", model, "--obs", data, "--out", tmp_path, check=False), "it is a directory")
    text, complex_obs = tmp_path / "text.npy", tmp_path / "complex.npy"
    text.write_text("0.1 0.2\n")
    np.save(complex_obs, np.array([0.1 + 1j, 0.2]))
    for obs, extra, message in [
        (text, (), "text.npy is not a .npy array file"),
        (complex_obs, (), "holds complex128 values; an observation is real numbers"),
        (complex_obs, ("--index", 0), "--index picks a row of an HDF5 observation file"),
        (ROOT / "data/observations/particle.h5", (), "holds simulations of particle, but the model was trained on two_moons"),
        (tmp_path / "none.h5", (), "no such observation file"),
        (data, ("--device", "nosuch"), "unknown device 'nosuch': use cpu, cuda, cuda:N or auto"),
    ]:
        assert_one_line_error(sbi_gen("sample", model, "--obs", obs, *extra, "--out", tmp_path / "s9.h5", check=False),
                              message)
    assert not (tmp_path / "s9.h5").exists()
    # A saved model with no training to resume is replaced only with --overwrite; other directories never.
    handed_over = tmp_path / "handed_over"
    handed_over.mkdir()
    for name in ("config.json", "weights.pt"):
        (handed_over / name).write_bytes((model / name).read_bytes())
    command = ("train", data, "--estimator", "maf", "--max-epochs", 1, "--quiet")
    assert_one_line_error(sbi_gen(*command, "--out", handed_over, check=False),
                          "holds a saved model and no training to resume; pass --overwrite")
    assert (handed_over / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert "model saved" in sbi_gen(*command, "--out", handed_over, "--overwrite").stdout
    assert json.loads((handed_over / "config.json").read_text())["estimator_name"] == "maf"
    state = (handed_over / "training_state.pt").read_bytes()
    assert_one_line_error(sbi_gen(*command, "--estimator-kwargs", '{"transforms": -2}', "--out", handed_over,
                                  "--overwrite", check=False), "maf: transforms must be positive, got -2")
    assert (handed_over / "training_state.pt").read_bytes() == state  # set aside, then put back
    assert sorted(p.name for p in handed_over.iterdir()) == ["config.json", "training_state.pt", "weights.pt"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_one_line_error(sbi_gen(*command, "--out", other, "--overwrite", check=False), "is a directory of other files")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    # A training set with no valid simulation: simulate warns, train refuses.
    broken = tmp_path / "broken.h5"
    proc = sbi_gen("simulate", "two_moons", "--n", 10, "--out", broken, "--config", '{"r_scale": 1e400}', "--quiet")
    assert "warning: no simulation in" in proc.stderr
    assert_one_line_error(sbi_gen("train", broken, "--out", tmp_path / "b", check=False),
                          "has no valid simulation to train on: of 10, 0 failed and 10 gave non-finite values")


@contextlib.contextmanager
def _cli_process(args, **options):
    """A real `sbi-gen` process in its own session; killed with its group if still running on exit."""
    proc = subprocess.Popen([sys.executable, "-m", "sbi_gen.cli", *map(str, args)], cwd=ROOT, start_new_session=True,
                            **options)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _read_until(stream, marker: bytes, timeout: float) -> bytes:
    """Bytes of ``stream`` (a pipe) up to and including the first ``marker``; AssertionError on timeout."""
    import select
    import time

    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} within {timeout} s: {seen[-500:]!r}"
        if select.select([stream], [], [], left)[0]:
            chunk = os.read(stream.fileno(), 4096)
            assert chunk, f"the process closed its output before {marker!r}: {seen[-500:]!r}"
            seen += chunk
    return seen


def test_ctrl_c_during_training_saves_the_best_weights_so_far(tmp_path):
    """A real SIGINT to a real `sbi-gen train` once its progress bar shows a finished epoch: the
    command saves the best weights so far, says so in one line and exits 130; the model samples.
    Before any epoch has finished, nothing is saved and the message says so."""
    from sbi_gen.checkpoint import load_model

    data = tmp_path / "moons.h5"
    sbi_gen("simulate", "two_moons", "--n", 20_000, "--out", data, "--seed", 0, "--quiet")
    model = tmp_path / "model"
    command = ["train", data, "--estimator", "nsf", "--max-epochs", 100000, "--patience", 100000]
    # A shell's background job inherits SIGINT ignored, and Python then keeps it ignored: the
    # command gets Ctrl-C's default disposition, as in a terminal.
    options = {"env": {**os.environ, "PYTHONUNBUFFERED": "1"}, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
               "preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)}
    with _cli_process([*command, "--out", model], **options) as proc:
        _read_until(proc.stderr, b"best=", timeout=120)  # the bar's postfix appears after the first epoch
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr.decode()
    last = stderr.decode().strip().splitlines()[-1]
    assert last.startswith("sbi-gen: interrupted; the model saved holds the best weights of the"), last
    assert last.endswith("; rerun the same command to resume"), last
    assert "Traceback" not in stderr.decode() and b"model saved to" in stdout
    loaded = load_model(model)
    assert loaded.history.interrupted and loaded.history.best_val_loss == min(loaded.history.val_loss)
    assert sbi_gen("sample", model, "--obs", ROOT / "data/observations/two_moons.h5", "--n", 100,
                   "--out", tmp_path / "samples.h5").returncode == 0

    # Interrupted before the first epoch ends (batches of 16: 1,125 steps, seconds): nothing saved, exit 130.
    with _cli_process([*command, "--out", tmp_path / "none", "--batch-size", 16], **options) as proc:
        _read_until(proc.stdout, b"training NPE", timeout=120)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert stderr.decode().strip().splitlines()[-1] == (
        "sbi-gen: interrupted; no model was saved (none is kept before the first epoch ends)"
    )
    # No model and no training state (the interrupt may even come before OUT is created).
    assert not (tmp_path / "none" / "config.json").exists() and not (tmp_path / "none" / "training_state.pt").exists()


def test_nle_samples_the_posterior_of_several_iid_observations(tmp_path):
    """`sbi-gen sample` with a .npy of k observations, or with `--index all` on a file simulated
    at one θ by `simulate --theta`: NLE combines them (its MCMC runs on the summed
    log-likelihoods) and writes them all, with the common θ as the truth; NPE, which conditions on
    one, says to use NLE. A file at one θ is refused for training and diagnostics, and a --theta
    of the wrong length, outside the prior or not numbers is refused in one line."""
    data = tmp_path / "moons.h5"
    sbi_gen("simulate", "two_moons", "--n", 2000, "--out", data, "--seed", 0, "--quiet")
    small = '{"transforms": 2, "hidden_features": [32, 32]}'
    for method in ("nle", "npe"):
        sbi_gen("train", data, "--method", method, "--estimator", "maf", "--estimator-kwargs", small,
                "--max-epochs", 3, "--out", tmp_path / method, "--quiet")
    events = tmp_path / "events.npy"
    np.save(events, np.array([[0.1, 0.2], [0.12, 0.18], [0.08, 0.22]]))
    out = sbi_gen("sample", tmp_path / "nle", "--obs", events, "--n", 200, "--out", tmp_path / "s.h5").stdout
    assert "MCMC: max R-hat" in out and "theta_1" in out
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["samples"].shape == (200, 2) and f["x_obs"].shape == (3, 2) and f.attrs["method"] == "nle"
    assert_one_line_error(sbi_gen("sample", tmp_path / "npe", "--obs", events, "--out", tmp_path / "p.h5", check=False),
                          "x_obs holds 3 observations of shape (2,), but NPE conditions on one", "train NLE")

    # The same from `simulate --theta` (k observations at one chosen θ) and `sample --index all`.
    at_theta = tmp_path / "at_theta.h5"
    sbi_gen("simulate", "two_moons", "--theta=-0.2,0.3", "--n", 4, "--out", at_theta, "--seed", 1, "--quiet")
    observed = load(at_theta)
    assert observed.theta.shape == (4, 2) and (observed.theta == torch.tensor([-0.2, 0.3])).all()
    assert read_info(at_theta)["prior_decoded"]["type"] == "PointMass"
    out = sbi_gen("sample", tmp_path / "nle", "--obs", at_theta, "--index", "all", "--n", 200,
                  "--out", tmp_path / "s4.h5").stdout
    assert "true" in out and "-0.2" in out
    with h5py.File(tmp_path / "s4.h5") as f:
        assert f["x_obs"].shape == (4, 2) and f["theta_true"][()].tolist() == pytest.approx([-0.2, 0.3])
        np.testing.assert_array_equal(f["x_obs"][()], observed.x.numpy())
    assert_one_line_error(sbi_gen("sample", tmp_path / "npe", "--obs", at_theta, "--index", "all",
                                  "--out", tmp_path / "p.h5", check=False), "x_obs holds 4 observations", "train NLE")
    fixed = f"{at_theta} holds simulations at one fixed θ [-0.2, 0.3]: observations, not simulations from a prior"
    assert_one_line_error(sbi_gen("train", at_theta, "--out", tmp_path / "bad", check=False), fixed)
    assert not (tmp_path / "bad").exists()
    assert_one_line_error(sbi_gen("diagnose", tmp_path / "npe", at_theta, "--out", tmp_path / "r", check=False), fixed)
    for theta, message in [("2,0", "--theta 2,0 lies outside the prior of two_moons"),
                           ("0.1", "--theta has 1 values but two_moons has 2 (theta_1, theta_2)"),
                           ("0.1,nan", "--theta contains NaN"), ("a,b", "--theta must be comma-separated numbers")]:
        assert_one_line_error(sbi_gen("simulate", "two_moons", f"--theta={theta}", "--n", 4,
                                      "--out", tmp_path / "no.h5", check=False), message)
    assert not (tmp_path / "no.h5").exists()


def test_train_killed_with_sigkill_resumes_and_ends_as_an_uninterrupted_run(tmp_path):
    """`kill -9` of a real `sbi-gen train` once its training state holds two epochs; the same
    command then resumes (it says so) and saves a model whose weights and history equal, bit for
    bit, those of the same command never interrupted. A finished run is not trained again; a
    changed setting is refused (one line) unless --overwrite."""
    import time

    import torch

    from sbi_gen.checkpoint import load_model

    data = tmp_path / "moons.h5"
    sbi_gen("simulate", "two_moons", "--n", 3000, "--out", data, "--seed", 0, "--quiet")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every run
    command = ["train", data, "--estimator", "nsf", "--max-epochs", 12, "--batch-size", 64, "--quiet"]

    def train(out, *extra, check=True):
        proc = subprocess.run([sys.executable, "-m", "sbi_gen.cli", *map(str, [*command, "--out", out, *extra])],
                              capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        assert not check or proc.returncode == 0, proc.stderr
        return proc

    train(tmp_path / "whole")
    killed = tmp_path / "killed"
    with _cli_process([*command, "--out", killed], env=env) as proc:
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, "no second epoch was saved in time"
            state = killed / "training_state.pt"
            if state.exists() and len(torch.load(state, weights_only=True)["history"]["val_loss"]) >= 2:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (killed / "config.json").exists()  # killed before the model was saved
    out = train(killed).stdout
    assert f"resuming the training saved in {killed / 'training_state.pt'}" in out
    whole, resumed = load_model(tmp_path / "whole"), load_model(killed)
    assert resumed.history.val_loss == whole.history.val_loss and len(whole.history.val_loss) == 12
    for a, b in zip(resumed.estimator.state_dict().values(), whole.estimator.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    assert "resuming" in train(killed).stdout  # finished: returns the same model at once
    assert load_model(killed).history.val_loss == whole.history.val_loss
    assert_one_line_error(train(killed, "--learning-rate", "3e-3", check=False),
                          "training_state.pt is the state of another training", "or pass --overwrite")
    assert len(load_model(killed).history.val_loss) == 12  # the refused run changed nothing
    train(killed, "--learning-rate", "3e-3", "--overwrite")
    assert load_model(killed).history.val_loss != whole.history.val_loss


def test_train_with_and_without_the_bijection(tmp_path):
    data = tmp_path / "moons.h5"
    sbi_gen("simulate", "two_moons", "--n", 500, "--out", data, "--seed", 0, "--quiet")
    for flags, bounded in (([], False), (["--bijection"], True)):
        model = tmp_path / f"model{bounded}"
        sbi_gen("train", data, *flags, "--estimator", "nsf", "--out", model, "--max-epochs", 1, "--quiet",
                "--estimator-kwargs", '{"transforms": 1, "hidden_features": [8]}')
        assert (json.loads((model / "config.json").read_text())["estimator"]["y_prior"] is not None) == bounded
        samples = tmp_path / f"samples{bounded}.h5"
        sbi_gen("sample", model, "--obs", ROOT / "data/observations/two_moons.h5", "--n", 200, "--out", samples)
        with h5py.File(samples) as f:
            assert np.all(np.abs(f["samples"][:]) <= 1)  # inside the prior box either way
    assert_one_line_error(sbi_gen("train", data, "--method", "nle", "--bijection", "--out", tmp_path / "m", check=False),
                          "--bijection applies to NPE only")


def test_train_auto_reports_every_family_and_keeps_one(tmp_path):
    data = tmp_path / "moons.h5"
    sbi_gen("simulate", "two_moons", "--n", 1500, "--out", data, "--seed", 0, "--quiet")
    model = tmp_path / "auto"
    out = sbi_gen("train", data, "--out", model, "--max-epochs", 2, "--quiet").stdout  # npe's default: auto
    line = next(line for line in out.splitlines() if line.startswith("validation loss by family after 2 epochs ("))
    losses = {name: float(value) for name, value in (part.split() for part in line.split("): ")[1].split("; ")[0].split(", "))}
    kept = line.rsplit("kept ", 1)[1]
    assert set(losses) == {"nsf", "maf", "gaussian"} and kept == min(losses, key=losses.get)
    config = json.loads((model / "config.json").read_text())
    assert config["estimator_name"] == kept and config["metadata"]["estimator_selection"].keys() == losses.keys()
    # A race as long as the training still leaves the state the same command resumes from.
    again = sbi_gen("train", data, "--out", model, "--max-epochs", 2, "--quiet").stdout
    assert f"resuming the training saved in {model / 'training_state.pt'}" in again
    assert json.loads((model / "config.json").read_text())["history"]["val_loss"] == config["history"]["val_loss"]
    for named in ([], ["--estimator", "auto"]):
        assert_one_line_error(sbi_gen("train", data, *named, "--estimator-kwargs", '{"transforms": 2}', "--out", tmp_path / "m",
                                      check=False), "name it with --estimator (e.g. nsf) instead of auto, which races nsf, maf and gaussian")


def test_train_on_maps_keeps_the_nsf_without_a_race(tmp_path):
    data = tmp_path / "maps.h5"
    sbi_gen("simulate", "cosmology", "--n", 200, "--config", '{"n_pix": 8}', "--out", data, "--seed", 0, "--quiet")
    model = tmp_path / "maps_npe"
    out = sbi_gen("train", data, "--out", model, "--max-epochs", 1, "--quiet").stdout
    assert "kept nsf without a race (cnn embedding: each family would train its own CNN)" in out
    assert "validation loss by family" not in out
    config = json.loads((model / "config.json").read_text())
    assert config["estimator_name"] == "nsf" and config["metadata"]["estimator_race_epochs"] == 0


def test_nle_through_the_cli(tmp_path):
    data = tmp_path / "lin.h5"
    sbi_gen("simulate", "two_moons", "--n", 1500, "--out", data, "--seed", 0, "--quiet")
    model = tmp_path / "nle"
    sbi_gen("train", data, "--method", "nle", "--out", model, "--max-epochs", 2,
            "--estimator-kwargs", '{"transforms": 1, "hidden_features": [16]}', "--quiet")
    out = sbi_gen("sample", model, "--obs", ROOT / "data/observations/two_moons.h5", "--n", 200, "--out", tmp_path / "s.h5").stdout
    assert "R-hat" in out
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["samples"].shape == (200, 2) and "rhat" in f.attrs


@pytest.mark.parametrize("name", ["particle", "cosmology", "gaussian_linear", "two_moons", "slcp"])
def test_shipped_observations_are_valid_files(name):
    info = read_info(ROOT / "data/observations" / f"{name}.h5")
    assert info["simulator"] == name and info["n_valid"] == info["n_simulations"] == 5
