"""The notebooks run top to bottom (nbclient) against the tiny offline model, so they cannot rot."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, parameters: str, cwd: Path):
    """Execute a notebook with `parameters` injected after its 'parameters' cell (as papermill does)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert "colab.research.google.com" in nb.cells[0].source  # the Open in Colab badge
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(parameters))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def test_continued_pretraining_notebook(tmp_path, tiny_model, corpus, general_file):
    run_notebook("continued_pretraining.ipynb", f"""
MODEL = {str(tiny_model)!r}
CORPUS = [{str(corpus)!r}]
GENERAL_EVAL = [{str(general_file)!r}]
OUTPUT = {str(tmp_path / "run")!r}
MERGED = {str(tmp_path / "merged")!r}
SEQ_LEN = 64
MAX_STEPS = 6
EXTRA = ["train.device=cpu", "train.grad_accum=1", "train.eval_every=3", "train.save_every=3",
         "train.learning_rate=5e-3"]
""", tmp_path)
    assert (tmp_path / "run" / "curves.png").is_file()
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged.zip").is_file()


def test_merge_large_model_notebook(tmp_path, tiny_model):
    from lora_cpt.model import add_lora, load_base

    add_lora(load_base(str(tiny_model), quantization="none"), r=4, alpha=8).save_pretrained(str(tmp_path / "adapter"))
    nb = run_notebook("merge_large_model.ipynb", f"""
ADAPTER = {str(tmp_path / "adapter")!r}
BASE = {str(tiny_model)!r}
OUTPUT = {str(tmp_path / "merged")!r}
DTYPE = "float32"
""", tmp_path)
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "peak RAM of this kernel" in printed and "float32" in printed
