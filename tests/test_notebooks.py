"""The notebooks execute top to bottom on CPU (each starts its own tiny run) and draw figures."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "spectral_dynamics", "modular_comparison"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_draws_figures(path, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTLAB_RUN_DIR", str(tmp_path))  # the notebooks' runs go here
    monkeypatch.delenv("OPTLAB_LOG_DIR", raising=False)
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any failing cell
    images = [
        base64.b64decode(out["data"]["image/png"])
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert images, f"{path.name} produced no figures"
    for png in images:
        # a real PNG of a real figure, not an empty canvas
        assert png.startswith(PNG_MAGIC) and len(png) > 5_000
    assert any(tmp_path.rglob("events.out.tfevents.*")), "the notebook's run wrote no TensorBoard events"
