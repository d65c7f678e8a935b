"""The Colab notebooks in experiments/ run end to end on CPU with tiny parameters."""

from pathlib import Path

import nbformat
import pytest
from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "experiments").glob("*.ipynb"))


def test_notebooks_present_and_stripped():
    assert {p.stem for p in NOTEBOOKS} >= {"train", "evaluate", "sample"}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
        assert "pip" in nb.cells[1].source and "install" in nb.cells[1].source, f"{path.name}: first code cell installs"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs not stripped"


def run_notebook(name: str, params: dict, workdir: Path) -> nbformat.NotebookNode:
    """Execute experiments/NAME.ipynb headless with its parameters cell replaced by `params`."""
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "experiments" / f"{name}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    defaults = {}
    exec(cell.source, {}, defaults)  # the notebook's own parameter names: the test must set them all
    assert set(params) == set(defaults), f"{name}: parameters differ: {set(params) ^ set(defaults)}"
    cell.source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", "")))
            out.append(o.get("data", {}).get("text/markdown", ""))
    return "\n".join(out)


@pytest.mark.slow
def test_notebooks_run_on_cpu(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("GPT2_JAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    run = tmp_path / "run"
    nb = run_notebook("train", dict(
        SIZE="tiny", DATASET="tiny_shakespeare", STEPS=8, BATCH_SIZE=4, MESH="1,-1,1", STRATEGY="fsdp",
        RUN_DIR=str(run), DATA_DIR=str(shared_data),
        OVERRIDES={"n_layer": 2, "n_embd": 64, "n_head": 2, "seq_len": 32, "eval_every": 4, "eval_batches": 2,
                   "sample_tokens": 16, "log_every": 1, "warmup_steps": 2},
        PLOT_EVERY_S=1,
    ), tmp_path)
    assert (run / "metrics.jsonl").is_file() and (run / "curves.png").is_file()
    assert "micro-batch: grad_accum=" in _text(nb) and "memory per device: state and batch" in _text(nb)  # the dry run
    assert (run / "checkpoints").is_dir()
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", []))

    nb = run_notebook("evaluate", dict(
        MODEL=str(run), HF_REPO="", TASKS="lambada,wikitext2,ptb", SPLIT="valid", DATA_DIR=str(shared_data),
        LIMIT=20, BATCH_SIZE=4,
    ), tmp_path)
    table = _text(nb)
    assert "lambada" in table and "wikitext2" in table and "ptb" in table

    nb = run_notebook("sample", dict(
        MODEL=str(run), HF_REPO="", PROMPTS=["ROMEO:", "JULIET:"], MAX_NEW_TOKENS=12, TOP_K=40, TOP_P=1.0,
        TEMPERATURE=1.0, SEED=0,
    ), tmp_path)
    assert "--- 'ROMEO:'" in _text(nb) and "--- 'JULIET:'" in _text(nb)
