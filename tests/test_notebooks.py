"""The notebooks run top to bottom (nbclient) against the tiny offline model, so they cannot rot."""

import ast
import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TRAINING, MERGE = "continued_pretraining.ipynb", "merge_large_model.ipynb"
# the test kernel imports lora_cpt from this checkout: never pip install; the tiny model trains on the CPU
HERE = 'INSTALL_FROM = ""\nALLOW_CPU = True\n'
CPU_RUN = ["train.device=cpu", "train.grad_accum=1", "train.learning_rate=5e-3"]


def load(name: str):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert "colab.research.google.com" in nb.cells[0].source  # the Open in Colab badge
    return nb


def parameters_index(nb) -> int:
    return next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))


def defaults(name: str) -> dict:
    """The values the notebook's parameters cell assigns."""
    nb = load(name)
    cell = nb.cells[parameters_index(nb)]
    return {t.id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body
            if isinstance(node, ast.Assign) for t in node.targets}


def execute(nb, cwd: Path):
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def run_notebook(name: str, parameters: str, cwd: Path):
    """Execute a notebook with `parameters` injected after its 'parameters' cell (as papermill does)."""
    nb = load(name)
    nb.cells.insert(parameters_index(nb) + 1, nbformat.v4.new_code_cell(parameters))
    return execute(nb, cwd)


def printed(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_continued_pretraining_notebook(tmp_path, tiny_model, corpus, general_file):
    run_notebook(TRAINING, HERE + f"""
MODEL = {str(tiny_model)!r}
CORPUS = [{str(corpus)!r}]
GENERAL_EVAL = [{str(general_file)!r}]
OUTPUT = {str(tmp_path / "run")!r}
MERGED = {str(tmp_path / "merged")!r}
SEQ_LEN = 64
MAX_STEPS = 6
EXTRA = {CPU_RUN + ["train.eval_every=3", "train.save_every=3"]!r}
""", tmp_path)
    assert (tmp_path / "run" / "curves.png").is_file()
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged.zip").is_file()


def test_training_notebook_stops_on_a_cpu_runtime(tmp_path, monkeypatch):
    """Without a GPU the check cell stops the run, says how to get one, and nothing after it runs."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the kernel sees no GPU, on a GPU machine too
    nb = load(TRAINING)
    assert defaults(TRAINING)["ALLOW_CPU"] is False
    with pytest.raises(CellExecutionError, match="Change runtime type → T4 GPU"):
        execute(nb, tmp_path)
    check = next(i for i, c in enumerate(nb.cells) if "get_device_capability" in c.source)
    assert check < next(i for i, c in enumerate(nb.cells) if "subprocess" in c.source)  # before the install
    assert any(o.get("ename") == "SystemExit" for o in nb.cells[check].outputs)
    assert all(c.get("execution_count") is None for c in nb.cells[check + 1:] if c.cell_type == "code")
    assert not list(tmp_path.iterdir())


def test_sample_corpus_and_default_paths(tmp_path, tiny_model):
    """CORPUS = "sample" needs no files; the merge notebook's defaults find the training notebook's run."""
    from lora_cpt.demo import domain_documents

    run_notebook(TRAINING, HERE + f"""
MODEL = {str(tiny_model)!r}
CORPUS = "sample"
SEQ_LEN = 64
MAX_STEPS = 3
EXTRA = {CPU_RUN + ["train.micro_batch_size=4", "data.eval_fraction=0.02"]!r}  # 2 topics held out: a quick eval
""", tmp_path)
    run = tmp_path / defaults(TRAINING)["OUTPUT"]  # the default, inside the work folder (the kernel's cwd)
    assert len(list((tmp_path / "sample-corpus").glob("*.md"))) == len(domain_documents())
    report = json.loads((run / "report.json").read_text())
    assert report["train"]["steps"] == 3 and report["eval"]["domain"]["adapter"]["ppl"] > 0

    nb = run_notebook(MERGE, HERE + 'DTYPE = "float32"\n', tmp_path)  # ADAPTER and OUTPUT as shipped
    merged = tmp_path / defaults(MERGE)["OUTPUT"]
    assert (merged / "model.safetensors").is_file()
    assert f"adapter: {run}" in printed(nb)


def test_sample_corpus_written_again_keeps_the_files(tmp_path):
    """Run all again after a disconnect: the sample on Drive keeps its modification times, which the prepared-data
    key (and so resume) depends on."""
    import os

    from lora_cpt.demo import write_sample_corpus

    files = write_sample_corpus(tmp_path / "sample")
    assert files and all(f.suffix == ".md" and f.stat().st_size for f in files)
    os.utime(files[0], ns=(1, 1))
    files[1].write_text("changed", encoding="utf-8")
    again = write_sample_corpus(tmp_path / "sample")
    assert again == files and files[0].stat().st_mtime_ns == 1  # the same text: left as it is
    assert files[1].read_text(encoding="utf-8") != "changed"  # other text: written again


def test_merge_notebook_defaults_to_the_training_run():
    train, merge = defaults(TRAINING), defaults(MERGE)
    assert merge["ADAPTER"] == train["OUTPUT"]
    assert (merge["USE_DRIVE"], merge["DRIVE_DIR"]) == (train["USE_DRIVE"], train["DRIVE_DIR"])
    assert train["DRIVE_DIR"].startswith("/content/drive/MyDrive/")
    # both resolve relative paths the same way: the same Drive cell
    drive = [[c.source for c in load(n).cells if "drive.mount" in c.source] for n in (TRAINING, MERGE)]
    assert drive[0] and drive[1] and drive[1][0] in drive[0][0]


def test_merge_large_model_notebook(tmp_path, tiny_model):
    from lora_cpt.model import add_lora, load_base

    add_lora(load_base(str(tiny_model), quantization="none"), r=4, alpha=8).save_pretrained(str(tmp_path / "adapter"))
    nb = run_notebook(MERGE, HERE + f"""
ADAPTER = {str(tmp_path / "adapter")!r}
BASE = {str(tiny_model)!r}
OUTPUT = {str(tmp_path / "merged")!r}
DTYPE = "float32"
""", tmp_path)
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert "peak RAM of this kernel" in printed(nb) and "float32" in printed(nb)


TORCH_PIN = re.compile(r"torch\s*==\s*\d")  # a fixed version; the install cell constrains to the installed one
REPO_URL = re.compile(r"(?:github\.com|colab\.research\.google\.com/github)/(?!OWNER/REPO\b)[\w.-]+/[\w.-]+")


@pytest.mark.parametrize("name", [TRAINING, MERGE])
def test_notebooks_pin_no_torch_and_name_no_repository(name):
    """Colab keeps its CUDA torch, and no cell presents a repository address that may not exist (OWNER/REPO are
    placeholders). Stored without outputs."""
    nb = load(name)
    for cell in nb.cells:
        assert not TORCH_PIN.search(cell.source), cell.source
        assert not REPO_URL.search(cell.source), cell.source
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None
    install = next(c.source for c in nb.cells if "subprocess" in c.source)
    assert "INSTALL_FROM" in install and "torch.__version__" in install
    login = next(c.source for c in nb.cells if "userdata" in c.source)
    assert "print(token" not in login and "{token" not in login  # the token is never printed
