"""Every notebook in notebooks/ runs top to bottom in quick mode, and README.md links it.

Notebooks read ``PPL_VAE_QUICK=1`` in their first code cell and shrink every epoch, step
and sample count, so the whole set runs in seconds each. The executed copy is thrown
away: the outputs saved in the repository are those of a full run.
"""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


@pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks yet")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel is a subprocess started below: it inherits this environment.
    monkeypatch.setenv("PPL_VAE_QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    client.execute()  # a failing cell raises CellExecutionError with its traceback


@pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks yet")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_linked_from_readme(path):
    if path.name not in (REPO / "README.md").read_text():
        pytest.fail(f"README.md does not mention notebooks/{path.name}: add a line linking it")
