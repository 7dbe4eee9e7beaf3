"""notebooks/explore.ipynb runs top to bottom (nbclient, the current interpreter's ipykernel)."""
from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


@pytest.mark.slow
def test_explore_notebook_runs_top_to_bottom(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # heatmap, comparison, radial profiles, stage grid, custom model
    markup = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert '<img src="data:image/png;base64,' in markup and "AGD report" in markup  # the reprs of section 8
    text = "".join(o.get("text", "") for o in outputs)
    assert "AGD score" in text and "same map as the in-memory active init: True" in text
