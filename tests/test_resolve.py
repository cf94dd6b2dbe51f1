"""Where a model name is loaded from: a local folder first, the HF cache when the Hub is unavailable,
and a one-line error at once (not ~50 s of retries) when neither can serve it. No network: the Hub
reachability probe is replaced in each test, or pointed at a closed local port."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from lora_cpt import hub
from lora_cpt.errors import LoraCptError

PROBE = hub.hub_reachable  # the real, cached probe


@pytest.fixture(autouse=True)
def hub_state(monkeypatch, tmp_path):
    """Each test starts with the Hub switch off, an empty HF cache and no cached probe answer."""
    PROBE.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield
    PROBE.cache_clear()


def no_probe():
    raise AssertionError("the Hub was probed")


def probe_says(answer: bool, calls: list | None = None):
    def probe():
        if calls is not None:
            calls.append(1)
        return answer

    return probe


@pytest.mark.parametrize("name", ["gpt2", "Qwen/Qwen2.5-0.5B", "runs/typo", "lora-cpt-demo/base-model-300",
                                  "org_1/name.v2"])
def test_hub_shaped(name):
    assert hub.is_hub_id(name)


@pytest.mark.parametrize("name", ["./x", "../x", "/abs/x", "~/x", "a/b/c", "x/", "a\\b", ".hidden", "a..b",
                                  "a--b", "C:\\models\\x", "name.git", "with space", "x" * 97])
def test_path_shaped(name):
    assert not hub.is_hub_id(name)


def test_local_folder_wins_without_a_hub_call(tiny_model, monkeypatch):
    from lora_cpt.model import load_tokenizer, model_positions

    monkeypatch.setattr(hub, "hub_reachable", no_probe)
    assert hub.resolve_model(str(tiny_model)) == str(tiny_model)
    assert hub.local_files_only(str(tiny_model)) is False
    monkeypatch.chdir(tiny_model.parent)  # a relative, hub-id-shaped name of an existing folder
    assert hub.is_hub_id(tiny_model.name)
    assert hub.resolve_model(tiny_model.name) == tiny_model.name
    assert model_positions(tiny_model.name) == 256
    assert load_tokenizer(tiny_model.name).eos_token_id is not None


def test_local_folder_checks(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", no_probe)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraCptError, match="has no config.json"):
        hub.resolve_model(str(tmp_path / "empty"))
    assert hub.resolve_model(str(tmp_path / "empty"), need_config=False) == str(tmp_path / "empty")
    with pytest.raises(LoraCptError, match="is a file; give the model directory"):
        hub.resolve_model(str(tmp_path / "file"))
    with pytest.raises(LoraCptError, match="model.name_or_path: not set"):
        hub.resolve_model("")


@pytest.mark.parametrize("name", ["x/y/z", "./typo", "../typo", "typo/", "~/no-such-lora-cpt-model", "a\\b"])
def test_missing_path_fails_at_once_naming_the_absolute_path(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "hub_reachable", no_probe)
    where = Path(name).expanduser().absolute()
    with pytest.raises(LoraCptError) as e:
        hub.resolve_model(name, "MODEL")
    assert str(e.value) == f"MODEL: '{name}' does not exist (looked for a local folder at {where})"


def test_hub_id_not_cached_and_hub_unreachable(tmp_path, monkeypatch):
    from lora_cpt.model import load_base

    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(hub, "hub_reachable", probe_says(False, calls))
    started = time.perf_counter()
    with pytest.raises(LoraCptError) as e:
        hub.resolve_model("runs/typo", "MODEL")
    assert str(e.value) == (f"MODEL: cannot load 'runs/typo': no local folder 'runs/typo' (from {tmp_path}); "
                            "the Hub is not reachable (offline) so it cannot be fetched as a model id either")
    with pytest.raises(LoraCptError, match="no local folder 'org/model'.*cannot be fetched as a model id either"):
        load_base("org/model", quantization="none")  # the loaders ask the same
    assert time.perf_counter() - started < 2
    assert calls


def test_hf_hub_offline_fails_without_probing(tmp_path, monkeypatch):
    from lora_cpt.merge import resolve_base

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "hub_reachable", no_probe)
    with pytest.raises(LoraCptError, match=r"cannot load 'runs/typo': no local folder 'runs/typo' .*HF_HUB_OFFLINE"
                                           r".*cannot be fetched as a model id either"):
        hub.resolve_model("runs/typo", "MODEL")
    with pytest.raises(LoraCptError, match="--base: cannot get 'org/model': no local folder"):
        resolve_base("org/model")
    assert hub.local_files_only("org/model") is True


def fake_cache(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """The HF cache layout huggingface_hub writes: refs/main names a snapshot folder holding the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0123456789abcdef" * 3)[:40]
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return snapshot


def test_cached_hub_id_loads_from_the_cache_offline(tiny_model, tmp_path, monkeypatch):
    import socket

    from lora_cpt.merge import resolve_base
    from lora_cpt.model import load_base, load_tokenizer, model_positions

    snapshot = fake_cache(Path(constants.HF_HUB_CACHE), "org/tiny", tiny_model)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "hub_reachable", probe_says(False))
    lookups = []

    def no_dns(*args, **kwargs):
        lookups.append(args[0])
        raise OSError("no network in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    # huggingface_hub builds its user-agent from a registry it fetches once per process (3 s timeout, no retries)
    # even for local_files_only downloads; that is not a model request, so it is taken as already answered
    from huggingface_hub.utils import _detect_agent

    monkeypatch.setattr(_detect_agent, "_registry", getattr(_detect_agent, "_EMPTY_REGISTRY", None), raising=False)
    assert hub.resolve_model("org/tiny") == "org/tiny"
    assert hub.local_files_only("org/tiny") is True
    assert model_positions("org/tiny") == 256
    assert load_tokenizer("org/tiny").eos_token_id is not None
    assert load_base("org/tiny", quantization="none").config.num_hidden_layers == 2
    assert resolve_base("org/tiny") == snapshot
    assert lookups == []  # nothing went to the network
    with pytest.raises(LoraCptError, match="cannot load 'org/other'"):
        hub.resolve_model("org/other")  # the cache does not make every id loadable


def test_reachable_hub_error_is_one_line_with_the_local_hint(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from lora_cpt.model import load_tokenizer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "hub_reachable", probe_says(True))
    seen = {}

    def not_found(name, **kwargs):
        seen.update(kwargs)
        raise OSError("org/gone is not a local folder and is not a valid model identifier\nIf this is private ...")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", not_found)
    assert hub.resolve_model("org/gone") == "org/gone"  # the Hub may have it: loading decides
    with pytest.raises(LoraCptError) as e:
        load_tokenizer("org/gone")
    assert str(e.value) == ("model.name_or_path: cannot load 'org/gone': org/gone is not a local folder and is not a "
                            f"valid model identifier (and no local folder 'org/gone' in {tmp_path})")
    assert seen["local_files_only"] is False


class FakeSession:
    def __init__(self, status: int | None = 200, hang: threading.Event | None = None):
        self.status, self.hang, self.calls = status, hang, []

    def head(self, url, timeout):
        self.calls.append((url, timeout))
        if self.hang is not None:
            self.hang.wait(30)  # a DNS lookup that never answers
        if self.status is None:
            raise OSError("[Errno -2] Name or service not known")
        return type("Response", (), {"status_code": self.status})()


@pytest.mark.parametrize("status, reachable", [(200, True), (404, True), (503, False), (None, False)])
def test_probe_answers_once_per_process(status, reachable, monkeypatch):
    import huggingface_hub.utils

    session = FakeSession(status)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: session)
    assert PROBE() is reachable
    assert PROBE() is reachable
    assert session.calls == [(constants.ENDPOINT, hub.PROBE_TIMEOUT_S)]


def test_probe_is_bounded_when_dns_hangs(monkeypatch):
    import huggingface_hub.utils

    release = threading.Event()
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: FakeSession(200, hang=release))
    monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 0.2)
    started = time.perf_counter()
    try:
        assert PROBE() is False
        assert time.perf_counter() - started < 2
    finally:
        release.set()


def test_eval_cli_missing_run_dir(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lora_cpt.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "hub_reachable", probe_says(False))
    result = CliRunner().invoke(app, ["eval", "runs/typo"])
    assert result.exit_code == 2
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: MODEL: cannot load 'runs/typo': no local folder")


def test_prepare_cli_recipe_model_from_another_folder(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lora_cpt.cli import app

    recipe = Path(__file__).parents[1] / "recipes" / "cpu_dry_run.yaml"  # model: lora-cpt-demo/base-model-300
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "hub_reachable", probe_says(False))
    result = CliRunner().invoke(app, ["prepare", str(recipe)])
    assert result.exit_code == 2
    assert "model.name_or_path: cannot load 'lora-cpt-demo/base-model-300': no local folder" in result.output
    assert "cannot be fetched as a model id either" in result.output


@pytest.mark.parametrize("offline", ["env", "probe"])
def test_eval_typo_subprocess_is_fast(offline, tmp_path):
    """The real process: HF_HUB_OFFLINE=1, or the Hub endpoint a closed local port (the probe's path).
    Measured ~2 s here; the bound only guards against the old ~50 s of retries."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    if offline == "env":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = "https://127.0.0.1:9"
    env["HF_HUB_CACHE"] = str(tmp_path / "hf-cache")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "lora_cpt", "eval", "runs/typo"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: MODEL: cannot load 'runs/typo': no local folder "
                                                   f"'runs/typo' (from {tmp_path.resolve()})"), result.stderr
    assert "cannot be fetched as a model id either" in lines[0]
    assert elapsed < 20
