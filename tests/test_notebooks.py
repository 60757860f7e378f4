"""The notebooks run top to bottom on the shipped miniature world, show their figures, leave nothing behind,
and are committed without outputs."""

import base64
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: The notebooks README.md and docs/index.md link, in reading order.
LINKED = ("01_audit_a_checkpoint.ipynb", "02_renormalization_is_not_enough.ipynb", "03_sensitivity.ipynb",
          "04_train_with_and_without_normguard.ipynb")


def test_every_linked_notebook_is_executed():
    """The execution test below runs every notebook in notebooks/ (a glob): an empty or moved folder must not
    pass by running nothing, and the notebooks the docs link must be among those it runs."""
    assert set(LINKED) <= {p.name for p in NOTEBOOKS}, sorted(p.name for p in NOTEBOOKS)
    root = Path(__file__).resolve().parents[1]
    for page, prefix in (("README.md", "notebooks/"), ("docs/index.md", "../notebooks/")):
        text = (root / page).read_text(encoding="utf-8")
        assert all(f"]({prefix}{name})" in text for name in LINKED), page


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path):
    """A pre-commit check: notebooks are committed stripped (no outputs, no execution counts), so that a diff
    shows only code and prose and no result of one machine is mistaken for the notebook's. Strip one with
    JupyterLab's "Clear Outputs of All Cells" and save, or `jupyter nbconvert --clear-output --inplace PATH`."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    dirty = [(i, what) for i, cell in enumerate(cells) if cell["cell_type"] == "code"
             for what, present in (("outputs", bool(cell.get("outputs"))),
                                   ("execution_count", cell.get("execution_count") is not None)) if present]
    assert not dirty, f"{path.name} is not stripped: (cell, field) {dirty}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_shows_figures_and_cleans_up(path, tmp_path, monkeypatch):
    cwd, scratch = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # the kernel's tempfile.gettempdir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch-cache"))  # torch's own cache, kept apart
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, [(e.get("ename"), e.get("evalue")) for e in errors]

    # Figures display as images, not as "<Figure size 700x340 with 1 Axes>".
    shown = [o for o in outputs if o.get("output_type") in ("display_data", "execute_result")]
    pngs = [o["data"]["image/png"] for o in shown if "image/png" in o.get("data", {})]
    unrendered = [o["data"]["text/plain"] for o in shown
                  if "image/png" not in o.get("data", {}) and str(o["data"].get("text/plain", "")).startswith("<Figure")]
    assert pngs and not unrendered, unrendered
    for png in pngs:
        assert base64.b64decode(png)[:8] == PNG_MAGIC

    # Nothing left in the temporary folder or the working directory once the kernel has exited.
    assert sorted(p.name for p in scratch.iterdir()) == []
    assert sorted(p.name for p in cwd.iterdir()) == []
