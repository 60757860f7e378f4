"""The notebooks run top to bottom on the tiny offline models, show their figures, and leave nothing behind."""

import base64
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
