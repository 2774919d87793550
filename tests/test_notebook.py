"""The quick-start notebook executes top to bottom, so it never rots."""

import importlib.util
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples/notebooks/quickstart.ipynb"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("nbclient") is None
    or importlib.util.find_spec("ipykernel") is None,
    reason="nbclient and ipykernel come with the 'test' and 'notebook' extras",
)


def test_notebook_is_stored_without_outputs():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_quickstart_notebook_executes(monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3").execute(
        cwd=str(NOTEBOOK.parent)
    )
    outputs = "".join(
        out.get("text", "")
        for cell in notebook.cells
        for out in cell.get("outputs", [])
    )
    assert "true model:" in outputs and "VAE:" in outputs
