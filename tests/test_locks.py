"""One command at a time per run folder, merge output, GGUF and cache entry (lora_cpt/lock.py), with real processes:
the second command is refused at once naming the first; a SIGKILLed holder leaves no lock that blocks the next."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import write_recipe
from lora_cpt.errors import LoraCptError
from lora_cpt.lock import hold_beside, hold_folder
from lora_cpt.rundir import LOCK, MANIFEST, OwnedDir
from realproc import hidden, holder, make_adapter, snapshot, start


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> tuple[Path, Path]:
    return make_adapter(tmp_path_factory.mktemp("lock-merge"))


def test_two_merges_into_one_output_the_second_is_refused_and_a_killed_first_blocks_nothing(adapter, tmp_path):
    base, adapter_dir = adapter
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    (out.parent / "notes.txt").write_text("mine\n")  # a user's file beside the output
    user = snapshot(base, adapter_dir, out.parent / "notes.txt")
    args = ["merge", adapter_dir, "--base", base, "--output", out, "--dtype", "float32", "--no-verify"]

    first = start(*args, pause="merge")  # holds the lock, a shard half written in its staging folder
    started = time.monotonic()
    code, stdout, stderr = start(*args).finish()
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "is in use by another lora-cpt command" in lines[0], stderr
    assert f"pid {first.pid} " in lines[0] and "merge" in lines[0] and str(out) in lines[0]
    assert time.monotonic() - started < 60  # at once, not after the first one ends

    first.signal(signal.SIGKILL)
    first.finish()
    left = hidden(out.parent)
    assert ".merged.lock" in left and any(n.startswith(".merged.tmp-") for n in left)  # what a kill leaves

    code, stdout, stderr = start(*args).finish()
    assert code == 0, stderr
    assert "left by an interrupted merge" in stdout
    assert (out / "model.safetensors").is_file() and (out / MANIFEST).is_file()
    assert hidden(out.parent) == [] and not any(p.name.startswith(".") for p in out.iterdir())
    assert snapshot(base, adapter_dir, out.parent / "notes.txt") == user


def test_train_on_a_folder_another_process_holds_is_refused_naming_it(tiny_model, corpus, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, run)
    user = snapshot(corpus, recipe)
    first = holder(f"from lora_cpt.lock import hold_folder; held = hold_folder({str(run)!r}, 'run', 'x')")
    code, stdout, stderr = start("train", recipe).finish()
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and f"train.output_dir: '{run}' is in use" in stderr
    assert f"pid {first.pid} " in stderr
    assert sorted(os.listdir(run)) == [LOCK]  # nothing of the second run was written
    first.signal(signal.SIGKILL)
    first.finish()
    with hold_folder(run, "run", "train.output_dir"):  # the killed holder's lock is no one's: taken over
        assert (run / LOCK).read_bytes().startswith(b"lora-cpt lock\n")
    assert os.listdir(run) == []  # the lock file goes with the lock
    assert snapshot(corpus, recipe) == user


def test_a_second_prepare_of_one_cache_entry_waits_and_other_entries_do_not(tokenizer, corpus, tmp_path):
    from lora_cpt import data

    cache = tmp_path / "cache"
    key = data._cache_key(tokenizer, data._expand_specs([str(corpus)], (), (), ()), data.BuildOptions(seq_len=64))
    first = holder(f"from lora_cpt.lock import hold_beside; held = hold_beside({str(cache / key)!r}, 'x')")
    said = []
    other = data.prepare_data(tokenizer, [str(corpus)], 32, cache_dir=cache, log=said.append)  # another entry
    assert not any("waiting" in s for s in said)
    box = []
    same = threading.Thread(target=lambda: box.append(
        data.prepare_data(tokenizer, [str(corpus)], 64, cache_dir=cache, log=said.append)))
    same.start()
    time.sleep(1.5)
    assert same.is_alive() and not box  # waiting for the holder
    assert any("waiting for the lora-cpt command" in s and f"pid {first.pid} " in s for s in said), said
    first.signal(signal.SIGKILL)  # its lock goes with it
    first.finish()
    same.join(60)
    assert box and box[0].report["cache"]["key"] == key and other.report["cache"]["key"] != key
    assert hidden(cache) == []


def test_the_lock_file_is_no_users_file_and_a_users_file_is_never_taken(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_bytes(b"lora-cpt lock\n{}\n")  # left by a killed command
    assert OwnedDir.claim(run, "run", "k").foreign() == []  # an empty folder still: claimable
    with hold_folder(run, "run", "k") as held:
        again = hold_folder(run, "run", "k")  # the same process: shared, not refused
        again.release()
        assert (run / LOCK).is_file()
    assert not (run / LOCK).exists()

    target = tmp_path / "merged"
    for content in (b"my notes\n", None):
        lock = tmp_path / ".merged.lock"
        if content is None:
            lock.unlink()
            lock.symlink_to(tmp_path / "elsewhere")
        else:
            lock.write_bytes(content)
        with pytest.raises(LoraCptError, match="is in the way: lora-cpt keeps its lock"):
            hold_beside(target, "--output")
        assert lock.is_symlink() if content is None else lock.read_bytes() == content
    assert not (tmp_path / "elsewhere").exists()


def test_export_to_a_gguf_another_process_writes_is_refused(tiny_model, tmp_path):
    from lora_cpt.export import export_gguf

    out = tmp_path / "m.gguf"
    first = holder(f"from lora_cpt.lock import hold_beside; held = hold_beside({str(out)!r}, '--output')")
    busy = rf"--output: '{out}' is in use by another lora-cpt command \(pid {first.pid} "
    with pytest.raises(LoraCptError, match=busy):
        export_gguf(tiny_model, out, "f32", log=lambda *_: None)
    assert not out.exists() and hidden(tmp_path) == [".m.gguf.lock"]  # the first one's
    first.signal(signal.SIGKILL)
    first.finish()
    assert export_gguf(tiny_model, out, "f32", log=lambda *_: None).output == out
    assert hidden(tmp_path) == []


def test_a_file_system_without_locks_warns_once_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """Lustre without `-o flock` and some network mounts refuse flock (ENOSYS, ENOLCK): the command works on,
    unprotected, says so once, and leaves no lock file or descriptor behind."""
    import errno
    import fcntl
    import os

    from lora_cpt import lock

    def no_locks(fd, flags):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    fds = len(os.listdir("/proc/self/fd"))
    first = lock.hold_beside(tmp_path / "merged", "--output")
    second = lock.hold_beside(tmp_path / "other.gguf", "--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    first.release()
    second.release()
    assert len(os.listdir("/proc/self/fd")) == fds
    err = capsys.readouterr().err
    assert err.count("file locks are not supported") == 1 and "merged" in err
