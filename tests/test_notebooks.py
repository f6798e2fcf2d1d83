"""The Colab notebooks run top to bottom on CPU (LORA_DPO_NOTEBOOK_SMOKE=1: the demo model, two steps, few pairs),
start with an install cell, and call only the public API."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import lora_dpo

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def _outputs(nb) -> str:
    text = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            text.append(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", "")))
    return "".join(text)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "export.ipynb"])
def test_notebook_is_colab_ready_and_uses_the_public_api(name):
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert "colab.research.google.com" in nb.cells[0].source  # the "Open in Colab" badge
    first = _code(nb)[0]
    assert "google.colab" in first and "pip" in first and "install" in first
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs
    for source in _code(nb):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_dpo"):
                assert node.module == "lora_dpo", f"{name} imports from {node.module}: public API only"
                assert {a.name for a in node.names} <= set(lora_dpo.__all__)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("lora_dpo") for a in node.names)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    import nbformat
    from nbclient import NotebookClient

    run_dir = tmp_path_factory.mktemp("notebooks") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_DPO_NOTEBOOK_SMOKE", "1")  # the kernel inherits the environment
    mp.setenv("LORA_DPO_NOTEBOOK_RUN_DIR", str(run_dir))
    mp.setenv("OMP_NUM_THREADS", "1")
    done = {}
    try:
        for name in ("quickstart.ipynb", "export.ipynb"):  # export.ipynb exports the run quickstart trained
            nb = nbformat.read(NOTEBOOKS / name, as_version=4)
            # run from notebooks/, as Jupyter does: the install cell has to find the repository root itself
            NotebookClient(nb, timeout=300, kernel_name="python3",
                           resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
            done[name] = nb
    finally:
        mp.undo()
    return run_dir, done


def test_quickstart_notebook_runs(executed):
    run_dir, done = executed
    out = _outputs(done["quickstart.ipynb"])
    assert "step-0 check" in out and "held-out, after training (policy)" in out
    assert "reward accuracy" in out and "KL(policy || reference) ~" in out
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["pairs"] == 4 and saved["kl"]["samples"] == 2  # the smoke settings reached the run
    assert (run_dir / "report.html").is_file()
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in done["quickstart.ipynb"].cells for o in c.get("outputs", []))  # the plots
    parity = json.loads((run_dir / "export" / "merged-dequantized" / "parity.json").read_text())
    assert parity["format"] == "merged" and "max |Δ log-prob| vs the trained policy" in out
    chat = out.split("What is the capital of France?\n  -> ", 1)[1].splitlines()[0]
    assert chat.strip()  # the merged model answered


def test_export_notebook_runs(executed):
    run_dir, done = executed
    out = _outputs(done["export.ipynb"])
    assert (run_dir / "export" / "adapter" / "parity.json").is_file()
    assert "adapter " in out and "README.md" in out and "adapter (PEFT): " in out
    assert out.split("adapter (PEFT): ", 1)[1].splitlines()[0].strip()
