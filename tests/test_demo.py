"""The README's main command, shrunk: simulate → train → sample → corner plot, in a real process."""

import json
import re
import subprocess
import sys

import numpy as np
from PIL import Image

from sbi_gen.demo import interval_coverage
from tests.test_cli import ROOT


def test_demo_runs_end_to_end_and_writes_a_corner_plot(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sbi_gen.demo", "--n", "2000", "--workers", "1", "--max-epochs", "3", "--n-check", "60",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    for fragment in ("== 1. simulate", "== 2. train", "== 3. posterior", "68% interval", "highest-density region", "corner plot written to",
                     "== 4. calibration on 60 fresh simulations", "SBC:", "HPD coverage", "TARP", "interval holds the truth"):
        assert fragment in proc.stdout, (fragment, proc.stdout)
    level = re.search(r"boundary of the (\d+)% highest-density region", proc.stdout)
    assert level is not None and 0 <= int(level.group(1)) <= 100, proc.stdout
    png = tmp_path / "particle_corner.png"
    assert str(png) in proc.stdout
    with Image.open(png) as image:
        assert image.size[0] > 400 and image.size[1] > 400
    assert (tmp_path / "particle.h5").exists() and (tmp_path / "particle_npe" / "config.json").exists()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["n_simulations"] == 60 and report["n_samples"] == 500
    assert (tmp_path / "report" / "sbc_ranks.png").exists() and (tmp_path / "report" / "coverage.png").exists()
    verdict = "\ncalibrated;" if report["calibrated"] else "\nNOT calibrated;"
    assert verdict in proc.stdout


def test_interval_coverage_counts_the_truths_inside_the_central_intervals():
    # Exact ranks of a calibrated posterior: uniform on {0..L}. The central 68% interval of the
    # quantiles (r + 0.5) / (L + 1) then holds about 68% of them, the 95% one about 95%.
    n_samples = 999
    ranks = np.arange(n_samples + 1)[:, None].repeat(2, axis=1)
    ranks[:, 1] = 0  # every truth below every draw: never inside
    table = interval_coverage(ranks, n_samples, ["uniform", "biased"]).splitlines()
    assert table[1].split()[:2] == ["uniform", "68%"] and table[1].split()[6] == "95%"
    assert table[2].split()[:2] == ["biased", "0%"] and table[2].split()[6] == "0%"
    # The binomial standard error over 1,000 simulations: sqrt(0.68 * 0.32 / 1000) = 1.5%.
    assert "68% ± 1%" in table[1] and "95% ± 1%" in table[1]
