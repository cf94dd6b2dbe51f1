"""SIGTERM and SIGHUP stop every command as Ctrl-C does (lora_cpt/interrupt.py): staging data removed, one line,
exit 128 + the signal; a killed command's leftovers are removed by its next run and never read as corpus changes;
`demo` stopped by a signal exits 75 and resumes."""

from __future__ import annotations

import gc
import signal
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_recipe
from lora_cpt.cli import app
from lora_cpt.rundir import LOCK, LOCK_MARK, MANIFEST, remove_leftovers, staging_folder
from realproc import hidden, make_adapter, snapshot, start


def test_sigterm_and_sighup_stop_prepare_merge_export_and_vocab_cleanly(tiny_model, corpus, tmp_path):
    """Each command is held mid-work (its staging data on disk), then signalled; the four run side by side."""
    base, adapter = make_adapter(tmp_path / "inputs")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "run")
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    user = snapshot(tiny_model, corpus, recipe, base, adapter, out)
    runs = {  # name: (process, signal, exit code, a staging path it names)
        "prepare": (start("prepare", recipe, f"data.cache_dir={cache}", pause="prepare"), signal.SIGTERM, 143,
                    f"{cache}/."),
        "merge": (start("merge", adapter, "--base", base, "--output", out / "merged", "--dtype", "float32",
                        pause="merge"), signal.SIGTERM, 143, f"{out}/.merged.tmp-"),
        "export": (start("export", tiny_model, "--to", "gguf", "--outtype", "f32", "--output", out / "m.gguf",
                         pause="export"), signal.SIGHUP, 129, f"{out}/.m.gguf."),
        "vocab": (start("vocab", recipe, "--min-count", "1", "--output", out / "tokens.txt", pause="vocab"),
                  signal.SIGHUP, 129, None),
    }
    for proc, signum, _, _ in runs.values():
        proc.signal(signum)
    for name, (proc, signum, code, staged) in runs.items():
        got, _, stderr = proc.finish()
        assert got == code, (name, got, stderr)
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(f"interrupted by {signal.Signals(signum).name}"), (name, stderr)
        assert "Traceback" not in stderr, (name, stderr)
        if staged:
            assert f"removed the unfinished {staged}" in last, (name, last)
    assert hidden(out) == [] and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not cache.exists()  # the cache folder the interrupted prepare made is taken back too
    assert snapshot(tiny_model, corpus, recipe, base, adapter, out) == user


def _gguf_head(first: str, second: str) -> bytes:
    """The start of a GGUF file with two string keys (what `export` writes first: the architecture, our marker)."""
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    kv = b"".join(string(k) + struct.pack("<I", 8) + string("x") for k in (first, second))
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + kv


def test_leftovers_of_a_killed_command_are_removed_only_when_they_are_provably_the_tools(tmp_path):
    from lora_cpt.export import MARKER, _staged_by_us

    merged, gguf = tmp_path / "merged", tmp_path / "m.gguf"
    ours_dir, _ = staging_folder(merged)
    (ours_dir / "model.safetensors").write_bytes(b"\0" * 64)
    ours_file = tmp_path / ".m.gguf.abcd1234.tmp"
    ours_file.write_bytes(_gguf_head("general.architecture", MARKER) + b"\0" * 64)
    empty = tmp_path / ".m.gguf.efgh5678.tmp"
    empty.touch()
    users = {  # named like staging data, but nothing proves lora-cpt made them
        ".merged.tmp-zzzz9999/notes.txt": b"my notes\n",  # no marker
        ".merged.tmp-yyyy8888/.lora-cpt-staging": b"not ours\n",  # a marker that does not say lora-cpt
        ".m.gguf.wxyz0000.tmp": b"my text\n",
        ".m.gguf.vuts1111.tmp": _gguf_head("general.architecture", "general.name"),  # someone else's GGUF
        ".merged.lock": b"my lock\n",
        "merged.tmp-abcdefgh/x": b"not hidden\n",
    }
    for name, data in users.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    before = snapshot(*(tmp_path / n for n in users))

    assert remove_leftovers(merged) == [ours_dir]
    assert sorted(remove_leftovers(gguf, ours=_staged_by_us)) == [ours_file, empty]
    assert snapshot(*(tmp_path / n for n in users)) == before


def test_the_previous_output_renamed_aside_is_removed_only_once_the_new_one_is_in_place(tmp_path):
    """A kill between replace_folder's two renames leaves `.NAME.old-PID`: the next merge removes it only when the
    new output is in place (both ours); alone, it may be the only copy, and it stays."""
    from lora_cpt.rundir import finish_folder

    merged = tmp_path / "merged"

    def our_folder(path):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"\0" * 8)
        finish_folder(path, "merged")

    old = tmp_path / ".merged.old-4242"
    our_folder(old)
    assert remove_leftovers(merged) == []  # the new output is not there: the old one may be all there is
    assert old.is_dir()
    our_folder(merged)
    users = tmp_path / ".merged.old-77"
    users.mkdir()
    (users / "notes.txt").write_text("mine\n")  # named like one, but no manifest: the user's
    before = snapshot(users)
    assert remove_leftovers(merged) == [old]
    assert not old.exists() and snapshot(users) == before


def test_staging_and_lock_files_in_a_corpus_do_not_change_the_data_key(corpus):
    from lora_cpt.corpus import expand

    def key():
        return expand(str(corpus), "data.train").fingerprint()

    before = key()
    staged, _ = staging_folder(corpus / "merged")  # a merge into the corpus folder, killed
    (staged / "model.safetensors").write_bytes(b"\0" * 64)
    (corpus / ".merged.lock").write_bytes(LOCK_MARK + b"{}\n")
    (corpus / ".m.gguf.abcd1234.tmp").write_bytes(b"GGUF")
    (corpus / "sub").mkdir()
    (corpus / "sub" / LOCK).write_bytes(LOCK_MARK)  # a run folder killed before its manifest
    assert key() == before
    (corpus / ".notes").mkdir()  # other hidden entries still count, as before
    assert key() != before


def test_demo_stopped_by_a_signal_exits_75_and_its_rerun_resumes(tmp_path, monkeypatch):
    import lora_cpt.demo as demo
    import lora_cpt.merge
    import lora_cpt.train
    from lora_cpt.config import save_recipe
    from lora_cpt.resilience import Preempted

    def build(out_dir: Path, texts, steps, log):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{}")

    calls = []

    def train(recipe, overwrite=False, log=print, **kwargs):  # stopped by SIGTERM at step 3, as SafetyCallback does
        calls.append(overwrite)
        run = Path(recipe.train.output_dir)
        if len(calls) == 1:
            (run / "checkpoints" / "checkpoint-3").mkdir(parents=True)
            (run / "checkpoints" / "checkpoint-3" / "trainer_state.json").write_text("{}")
            save_recipe(lora_cpt.train.with_absolute_base(recipe), run / "config.yaml")
            raise Preempted(str(run / "checkpoints" / "checkpoint-3"), 3, signal.SIGTERM)
        return {"run_dir": str(run)}

    monkeypatch.setattr(demo, "build_base_model", build)
    monkeypatch.setattr(lora_cpt.train, "train", train)
    monkeypatch.setattr(lora_cpt.merge, "merge_adapter", lambda *a, **k: type("R", (), {"report": {}})())
    monkeypatch.setattr(demo, "summary", lambda report, seconds: "done")
    args = ["demo", "--output", str(tmp_path / "d"), "--base-steps", "20", "--max-steps", "5"]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 75, first.output
    assert "checkpoint-3 is complete: run the same command again to resume" in first.output
    assert "Traceback" not in first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert calls == [True, False]  # a new demo starts over; the stopped one resumes
    other = runner.invoke(app, [*args[:-1], "7"])  # other settings: starts over
    assert other.exit_code == 0 and calls[-1] is True
    del first  # its traceback holds the first demo's frame (and lock) in this process; a CLI process exits
    gc.collect()
    assert (tmp_path / "d" / MANIFEST).is_file() and not (tmp_path / "d" / LOCK).exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_the_interrupt_handler_raises_once_and_is_removed_after(signum):
    import os

    from lora_cpt.interrupt import Interrupted, exit_code, stopping

    previous = signal.getsignal(signum)
    with pytest.raises(Interrupted) as caught:
        with stopping():
            os.kill(os.getpid(), signum)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert exit_code(caught.value) == 128 + signum
    assert signal.getsignal(signum) == previous


def test_a_first_demo_stopped_while_building_its_base_holds_its_lock_and_leaves_nothing(tmp_path, monkeypatch):
    """The demo folder's lock is held while the base is built; an interrupt there propagates as an interrupt (the
    CLI's exit 130/143/129, no traceback) and a new folder is removed whole, lock file included."""
    import lora_cpt.demo as demo
    from lora_cpt import lock

    seen = []

    def interrupted(*args, **kwargs):
        seen.append(dict(lock._held))
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "build_base_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(tmp_path / "demo", log=lambda *a: None)
    assert seen and any(path.parent == tmp_path / "demo" for path in seen[0])  # held while building
    assert not (tmp_path / "demo").exists() and not lock._held
