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


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_continued_pretraining_notebook(tmp_path, tiny_model, corpus, general_file):
    """Run all, then Run all again on the finished run: the second shows it (curves, evaluation) and merges it
    again without training or stopping at the train cell, and leaves the run folder byte for byte as it was."""
    parameters = HERE + f"""
MODEL = {str(tiny_model)!r}
CORPUS = [{str(corpus)!r}]
GENERAL_EVAL = [{str(general_file)!r}]
OUTPUT = {str(tmp_path / "run")!r}
MERGED = {str(tmp_path / "merged")!r}
SEQ_LEN = 64
MAX_STEPS = 6
EXTRA = {CPU_RUN + ["train.eval_every=3", "train.save_every=3"]!r}
"""
    nb = load(TRAINING)
    nb.cells.insert(parameters_index(nb) + 1, nbformat.v4.new_code_cell(parameters))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():  # Run all, then Run all again in the same session
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        assert (tmp_path / "run" / "curves.png").is_file()
        assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged.zip").is_file()
        assert "not training it again" not in printed(nb)
        run = snapshot(tmp_path / "run")
        (tmp_path / "merged.zip").unlink()
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
    assert "holds a run finished with this recipe (6 steps): not training it again" in printed(nb)
    assert snapshot(tmp_path / "run") == run
    curves = next(c for c in nb.cells if "curves.png" in c.source and c.cell_type == "code")
    assert any("image/png" in o.get("data", {}) for o in curves.outputs)
    assert "domain" in printed(nb) and (tmp_path / "merged.zip").is_file()  # the table, then the merge again


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
EXTRA = {CPU_RUN + ["train.micro_batch_size=4", "data.eval_fraction=0.02"]!r}  # the 10,000-token floor: a quick eval
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


def install_cell(monkeypatch, cwd: Path, setting, returncode: int = 0) -> list:
    """Run the install cell as a fresh runtime would (lora_cpt not importable) with pip mocked: the commands
    it would run."""
    import importlib.util
    import subprocess

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lora_cpt" else real(name, *a))
    calls = []

    def pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, returncode, "", "ERROR: no such package" if returncode else "")

    monkeypatch.setattr(subprocess, "run", pip)
    monkeypatch.chdir(cwd)
    cell = next(c.source for c in load(TRAINING).cells if "subprocess" in c.source)
    exec(compile(cell, "install-cell", "exec"), {"INSTALL_FROM": setting, "__name__": "__main__"})
    return calls


def test_install_cell_installs_the_repository_by_default(monkeypatch, tmp_path):
    """The default needs no package index: it installs the copy of the repository it finds (here: the checkout
    the notebook sits in), and says what to do when there is none."""
    import sys

    import torch

    setting = defaults(TRAINING)["INSTALL_FROM"]
    [command] = install_cell(monkeypatch, NOTEBOOKS, setting)
    repo = NOTEBOOKS.parent
    assert command[:5] == [sys.executable, "-m", "pip", "install", "-q"] and command[5] == str(repo)
    assert 'name = "lora-cpt"' in (repo / "pyproject.toml").read_text()
    assert Path(command[-1]).read_text() == f"torch=={torch.__version__}\n" and command[-2] == "-c"

    with pytest.raises(SystemExit, match=r"lora-cpt is not on PyPI and no copy of its repository is on this runtime "
                                         r"\(looked in .*/content/lora-cpt.*git clone"):
        install_cell(monkeypatch, tmp_path, setting)
    git = "git+https://github.com/OWNER/REPO"
    assert install_cell(monkeypatch, tmp_path, git)[0][5] == git  # given: passed to pip as it is
    with pytest.raises(SystemExit, match="pip could not install 'git"):
        install_cell(monkeypatch, tmp_path, git, returncode=1)
