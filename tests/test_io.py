import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab import io
from lmlab.errors import DataError
from lmlab.io import atomic_dir, existing_artefact, read_manifest, write_json_atomic, write_manifest

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "artefact"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("v1")
    assert (final / "a.txt").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("half-written")
            raise RuntimeError("crash")
    assert (final / "a.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["artefact"]  # no temporary left behind
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("v2")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]


def test_manifest_checksums_detect_changes(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"hello")
    m = write_manifest(tmp_path, {"kind": "thing", "n": 1})
    assert m["files"]["x.bin"]["bytes"] == 5
    assert read_manifest(tmp_path, verify=True)["kind"] == "thing"
    (tmp_path / "x.bin").write_bytes(b"hellO")
    with pytest.raises(DataError, match="checksum"):
        read_manifest(tmp_path, verify=True)
    (tmp_path / "x.bin").unlink()
    with pytest.raises(DataError, match="missing"):
        read_manifest(tmp_path, verify=True)


def test_missing_or_broken_manifest_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_write_json_atomic(tmp_path):
    write_json_atomic(tmp_path / "d" / "r.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "d" / "r.json").read_text()) == {"a": [1, 2], "b": 1}


def test_invocation_records_the_real_niceness_and_arguments(monkeypatch):
    import os
    import sys

    from lmlab.io import invocation

    monkeypatch.setattr(sys, "argv", ["recipes/x.py", "--out", "a b.json"])
    monkeypatch.setattr(os, "nice", lambda inc: 0)
    assert invocation() == "python recipes/x.py --out 'a b.json'"
    assert invocation(["--k", "4"]) == "python recipes/x.py --k 4"
    monkeypatch.setattr(os, "nice", lambda inc: 10)
    assert invocation([]) == "nice -n 10 python recipes/x.py"


def test_atomic_dir_interrupted_between_its_renames_keeps_the_old_folder(tmp_path, monkeypatch):
    import os

    import lmlab.io as io_mod

    final = tmp_path / "art"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("1")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # final is aside as .art.old; the new folder is not in yet
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(io_mod.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "v").write_text("2")
    monkeypatch.setattr(io_mod.os, "replace", real)
    assert (final / "v").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_atomic_dir_repairs_a_replace_killed_between_its_renames(tmp_path):
    final = tmp_path / "art"
    old = tmp_path / ".art.old"  # what a process killed between the two renames leaves: no final, the old aside
    old.mkdir()
    (old / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(final):
        raise RuntimeError("this build fails")
    assert (final / "v").read_text() == "1" and not old.exists()


def test_atomic_dir_removes_what_a_killed_process_left_and_keeps_a_live_ones(tmp_path):
    final = tmp_path / "art"
    killed = ("import os, signal, sys\nfrom lmlab.io import atomic_dir\nwith atomic_dir(sys.argv[1]) as tmp:\n"
              "    (tmp / 'big').write_bytes(b'x' * 1000)\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", killed, str(final)], env={**os.environ, "PYTHONPATH": SRC})
    assert r.returncode == -signal.SIGKILL
    (left,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the killed build's half-written folder
    assert left.name.startswith(f".art.{io._HOST}-")
    live = tmp_path / f".art.{io._HOST}-{os.getpid()}.abc.tmp"  # a live process's: a build in progress
    live.mkdir()
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("1")
    assert not left.exists() and live.is_dir() and (final / "v").read_text() == "1"


def test_atomic_dir_refuses_to_replace_a_file(tmp_path):
    final = tmp_path / "notes.txt"
    final.write_text("the user's")
    with pytest.raises(DataError, match="is a file, not a folder"), atomic_dir(final):
        pass
    assert final.read_text() == "the user's" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_write_bytes_atomic_removes_what_a_killed_write_left_and_nothing_else(tmp_path):
    final = tmp_path / "results.json"
    killed = ("import os, signal, sys\nfrom lmlab import io\n"
              "io.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"  # killed after writing, before rename
              "io.write_json_atomic(sys.argv[1], {'half': 'written'})\n")
    proc = subprocess.Popen([sys.executable, "-c", killed, str(final)], env={**os.environ, "PYTHONPATH": SRC})
    assert proc.wait() == -signal.SIGKILL
    (left,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert left.name.startswith(f".results.json.{io._HOST}-{proc.pid}.") and not final.exists()
    keep = [tmp_path / f".results.json.{io._HOST}-{os.getpid()}.abc.tmp",  # a write in progress in a live process
            tmp_path / f".results.json.otherhost-{proc.pid}.abc.tmp",  # another host's (a shared folder)
            tmp_path / f".results.json.{io._HOST}-{proc.pid}.{io._HOST}-1.abc.tmp"]  # results.json.HOST-PID's
    for p in keep:
        p.write_text("keep")
    write_json_atomic(final, {"v": 1})
    assert json.loads(final.read_text()) == {"v": 1} and not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == sorted(p.name for p in keep)


def test_existing_artefact_allows_only_an_earlier_one_of_its_kind(tmp_path):
    assert existing_artefact(tmp_path / "absent", "thing") is None
    (tmp_path / "empty").mkdir()
    assert existing_artefact(tmp_path / "empty", "thing") is None
    with atomic_dir(tmp_path / "mine") as tmp:
        write_manifest(tmp, {"kind": "thing"})
    assert existing_artefact(tmp_path / "mine", "thing")["kind"] == "thing"
    with pytest.raises(DataError, match="is not a other thing: writing there would delete it"):
        existing_artefact(tmp_path / "mine", "other", what="other thing")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="not a thing"):
        existing_artefact(tmp_path / "user", "thing")
    assert existing_artefact(tmp_path / "user", "thing", ignore={"notes.txt"}) is None
    (tmp_path / "mine" / "manifest.json").write_text("{")
    with pytest.raises(DataError, match="; fix it first"):
        existing_artefact(tmp_path / "mine", "thing", broken_hint="; fix it first")
