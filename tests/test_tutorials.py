"""The tutorial notebooks: committed without outputs, and runnable top to bottom in a real kernel.

Each notebook is executed by nbclient in a Jupyter kernel started from this interpreter (a
kernel spec written for the test, so no other Python on the machine is picked up), with
``SBI_GEN_TUTORIAL_FAST=1`` (every budget shrunk) and a temporary working directory for the
files it writes. A cell that raises fails the test.
"""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = [
    "01_first_posterior.ipynb",
    "02_collider_latent_chain.ipynb",
    "03_cosmology_maps.ipynb",
    "04_three_generative_families.ipynb",
]
KERNEL = "sbi-gen-tutorial-test"
# Per cell, in fast mode; the slowest fast-mode cell takes seconds on an idle machine.
CELL_TIMEOUT = 300


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory):
    """A kernel spec that runs ``sys.executable -m ipykernel_launcher``: the kernel is this venv's Python."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL
    spec.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    return [str(root)]


def test_the_tutorials_folder_holds_exactly_the_four_notebooks():
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean_and_documents_fast_mode(name):
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "no code cells"
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), "outputs are not stripped"
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    for words in ("You will learn", "Time.", "SBI_GEN_TUTORIAL_FAST=1"):
        assert words in first.source, f"the opening cell does not say {words!r}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_fast_mode(name, kernel_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("SBI_GEN_TUTORIAL_FAST", "1")
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    manager = KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
    client = NotebookClient(
        nb, km=manager, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails

    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    assert "fast mode: True" in "".join(o.get("text", "") for o in code[0].outputs)
    outputs = [o for cell in code for o in cell.outputs]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures, "no figure was displayed"
    # A figure that fails to render shows up as its text repr only.
    bare = [o for o in outputs if o.get("data", {}).get("text/plain", "").startswith("<Figure") and "image/png" not in o["data"]]
    assert not bare, f"{len(bare)} figures were shown as text only"
    # The notebook writes its files under the working directory, not into the repository.
    assert (tmp_path / "_data").is_dir()
