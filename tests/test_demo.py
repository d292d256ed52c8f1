"""The README's main command, shrunk: simulate → train → sample → corner plot, in a real process."""

import subprocess
import sys

from PIL import Image

from tests.test_cli import ROOT


def test_demo_runs_end_to_end_and_writes_a_corner_plot(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sbi_gen.demo", "--n", "2000", "--workers", "1", "--max-epochs", "3", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    for fragment in ("== 1. simulate", "== 2. train", "== 3. posterior", "68% interval", "corner plot written to"):
        assert fragment in proc.stdout, (fragment, proc.stdout)
    png = tmp_path / "particle_corner.png"
    assert str(png) in proc.stdout
    with Image.open(png) as image:
        assert image.size[0] > 400 and image.size[1] > 400
    assert (tmp_path / "particle.h5").exists() and (tmp_path / "particle_npe" / "config.json").exists()
