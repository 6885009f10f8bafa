"""notebooks/iteration_influence.ipynb runs top to bottom in a real Jupyter kernel and shows its plots."""

import re
import time
from pathlib import Path

import nbformat
from conftest import ROOT
from nbclient import NotebookClient


def test_iteration_influence_notebook_runs(tmp_path, monkeypatch):
    # No checkpoint given: the notebook trains its tiny IIET, here into tmp_path rather than the repository's runs/.
    started = time.time()
    monkeypatch.setenv("IIET_CHECKPOINT", str(tmp_path / "none.ckpt"))
    monkeypatch.setenv("IIET_TINY_RUN", str(tmp_path / "tiny_iiet"))
    notebook = nbformat.read(ROOT / "notebooks" / "iteration_influence.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # heatmap, convergence over training, solvers, influence bars, Pareto curve
    text = "".join(o.get("text", "") for o in outputs)
    # It analyses the checkpoint it has just written, not a last.ckpt an earlier run left in the same folder.
    checkpoint = ROOT / Path(re.search(r"^checkpoint: (.+)$", text, re.M).group(1))
    assert checkpoint.is_relative_to(tmp_path / "tiny_iiet") and checkpoint.stat().st_mtime >= started
    assert "last validation, contraction per layer: [" in text and "residual after 3 evaluations: Picard" in text
    assert "threshold 0.00: schedule [3, 3, 3, 3]" in text and "threshold 1.00: schedule [1, 1, 1, 1]" in text
