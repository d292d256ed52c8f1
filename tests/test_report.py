"""`sbi-gen diagnose` and `sbi-gen plot` through real subprocesses on real files."""

import json

import h5py
import numpy as np
import pytest
from PIL import Image

from tests.test_cli import assert_one_line_error, sbi_gen

SMALL_FLOW = json.dumps({"transforms": 1, "hidden_features": [16, 16]})


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    root = tmp_path_factory.mktemp("moons")
    sbi_gen("simulate", "two_moons", "--n", 3000, "--out", root / "train.h5", "--seed", 1, "--quiet")
    sbi_gen("simulate", "two_moons", "--n", 300, "--out", root / "test.h5", "--seed", 2, "--quiet")
    sbi_gen("train", root / "train.h5", "--estimator", "nsf", "--out", root / "npe", "--max-epochs", 8,
            "--estimator-kwargs", SMALL_FLOW, "--quiet")
    return root


def test_diagnose_writes_every_diagnostic_and_prints_verdicts(moons):
    out = moons / "report"
    proc = sbi_gen("diagnose", moons / "npe", moons / "test.h5", "--out", out, "--n-sims", 200, "--n-samples", 100, "--c2st", 1)
    for fragment in ("SBC:", "HPD coverage:", "TARP:", "PPC:", "C2ST: mean accuracy", "report and figures in"):
        assert fragment in proc.stdout, (fragment, proc.stdout)
    report = json.loads((out / "report.json").read_text())
    assert report["n_simulations"] == 200 and report["n_samples"] == 100
    assert len(report["sbc"]["ranks"]) == 200 and len(report["sbc"]["chi2_p_values"]) == 2
    assert len(report["coverage"]["coverage"]) == len(report["coverage"]["levels"]) == 101
    assert report["tarp"]["method"] == "tarp"
    assert 0.5 <= report["c2st"]["mean"] <= 1.0
    assert isinstance(report["calibrated"], bool)
    assert len(report["verdicts"]) == 5
    for name in ("sbc_ranks", "coverage", "corner", "training", "ppc"):
        path = out / f"{name}.png"
        assert report["figures"][name] == path.name
        with Image.open(path) as image:
            assert image.size[0] > 300


def test_sample_then_plot_overlays_files_with_the_truth(moons):
    first, second = moons / "s1.h5", moons / "s2.h5"
    sbi_gen("sample", moons / "npe", "--obs", moons / "test.h5", "--index", 0, "--n", 2000, "--out", first)
    sbi_gen("sample", moons / "npe", "--obs", moons / "test.h5", "--index", 1, "--n", 2000, "--out", second)
    png = moons / "plots" / "corner.png"
    out = sbi_gen("plot", first, second, "--out", png, "--label", "obs 0", "--label", "obs 1").stdout
    assert str(png) in out
    with Image.open(png) as image:
        assert image.size[0] > 300 and image.size[1] > 300
    truth = "0.1,-0.2"
    sbi_gen("plot", first, "--out", moons / "c2.pdf", "--truth", truth)
    assert (moons / "c2.pdf").read_bytes().startswith(b"%PDF")


def test_diagnose_and_plot_errors_are_one_line(moons, tmp_path):
    other = tmp_path / "particle.h5"
    sbi_gen("simulate", "particle", "--n", 50, "--out", other, "--seed", 1, "--quiet")
    assert_one_line_error(sbi_gen("diagnose", moons / "npe", other, "--out", tmp_path / "r", check=False),
                          "holds simulations of particle, but the model was trained on two_moons")
    # The training set (or any file of its seed) is not held out; a report directory is not a file.
    assert_one_line_error(sbi_gen("diagnose", moons / "npe", moons / "train.h5", "--out", tmp_path / "r", check=False),
                          "was simulated with the training set's seed (1)", "another --seed")
    assert_one_line_error(sbi_gen("diagnose", moons / "npe", moons / "test.h5", "--out", other, check=False),
                          "it is a file, --out is a report directory")
    samples = tmp_path / "s.h5"
    sbi_gen("sample", moons / "npe", "--obs", moons / "test.h5", "--n", 50, "--out", samples)
    assert_one_line_error(sbi_gen("plot", samples, samples, "--out", tmp_path / "c.png", "--label", "a", check=False),
                          "1 --label for 2 samples files")
    assert_one_line_error(sbi_gen("plot", tmp_path / "none.h5", "--out", tmp_path / "c.png", check=False),
                          "no such samples file")
    assert_one_line_error(sbi_gen("plot", samples, "--out", tmp_path / "c.png", "--truth", "0.1,nan", check=False),
                          "--truth contains NaN")
    assert_one_line_error(sbi_gen("diagnose", tmp_path / "missing", other, "--out", tmp_path / "r", check=False), "no such checkpoint")
    assert_one_line_error(sbi_gen("plot", other, "--out", tmp_path / "c.png", check=False), "not a samples file")
    with h5py.File(tmp_path / "samples.h5", "w") as f:
        f.create_dataset("samples", data=np.zeros((10, 2)))
        f.attrs["format"] = "sbi_gen.samples"
    assert_one_line_error(sbi_gen("plot", tmp_path / "samples.h5", "--out", tmp_path / "c.png", "--truth", "a,b", check=False), "--truth")
