"""Checks of the committed tutorial notebooks in ``tutorials/``.

The fast checks read the ``.ipynb`` files only: they must be valid nbformat 4 for the
``python3`` kernel, honour ``LVMKIT_FAST`` in their first code cell, and carry the outputs
of one clean top-to-bottom run (what a reader sees on the web). Executing them is the job
of ``LVMKIT_FAST=1 pytest --nbmake tutorials/`` (``make notebooks``); the slow test below
does the same through ``nbclient`` for ``make test-slow``.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
EXPECTED = [
    "01_your_own_model.ipynb",
    "02_discrete_latents.ipynb",
    "03_hierarchical_guides.ipynb",
    "04_arviz.ipynb",
]
MAX_BYTES = 1_500_000
FAST_FLAG = re.compile(
    r"""FAST\s*=\s*os\.environ\.get\(\s*["']LVMKIT_FAST["']\s*\)\s*==\s*["']1["']"""
)
ids = [path.name for path in NOTEBOOKS]


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_four_tutorials_exist_and_the_readme_lists_them():
    assert [path.name for path in NOTEBOOKS] == EXPECTED
    readme = (TUTORIALS / "README.md").read_text()
    for name in EXPECTED:
        assert name in readme, f"tutorials/README.md does not mention {name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_is_valid_nbformat_for_the_python3_kernel(path):
    notebook = read(path)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert notebook.cells[0].cell_type == "markdown"
    assert notebook.cells[0].source.startswith("# "), "first cell should be the title"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_first_code_cell_reads_the_fast_flag(path):
    first = code_cells(read(path))[0].source
    assert FAST_FLAG.search(first), f"{path.name}: first code cell must set FAST from LVMKIT_FAST"
    # Fast mode shrinks counts; it must not skip cells.
    for cell in code_cells(read(path)):
        assert "if not FAST" not in cell.source, f"{path.name}: a cell is skipped in fast mode"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_saved_outputs_come_from_one_clean_full_run(path):
    cells = code_cells(read(path))
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts}; re-run the notebook top to bottom"
    )
    outputs = [output for cell in cells for output in cell.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: saved error output {errors[0].get('ename')}"
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "FAST=False" in streams, f"{path.name}: saved outputs are not from a full-mode run"
    assert "Traceback" not in streams
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name}: no plot in the saved outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_file_stays_small(path):
    assert path.stat().st_size < MAX_BYTES


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_runs_in_fast_mode(path, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    monkeypatch.setenv("LVMKIT_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = read(path)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    streams = "".join(
        o.get("text", "") for cell in code_cells(notebook) for o in cell.outputs
        if o.output_type == "stream"
    )
    assert "FAST=True" in streams
    assert any("image/png" in o.get("data", {}) for c in code_cells(notebook) for o in c.outputs)
