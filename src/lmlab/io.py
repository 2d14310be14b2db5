"""Crash-safe file writing: temporary names renamed into place, manifests with checksums.

Everything lmlab builds (tokenizers, checkpoints, token shards, datastores) goes through these
helpers, so an interrupt leaves either the old artefact or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from lmlab.errors import DataError

MANIFEST = "manifest.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it and rename it into place.

    The temporary name holds this host and process id (:func:`_temp_prefix`), so a write killed before its rename
    (SIGKILL, power loss) leaves a ``.NAME.HOST-PID.*.tmp`` file that the next write of ``path`` removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and manifests are meant to be read by others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


_HOST = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


def _temp_prefix(final: Path) -> str:
    """This process's prefix for temporary names beside ``final`` (``.NAME.HOST-PID.``), after removing the
    temporary files and folders that dead processes on this host left there (``.NAME.HOST-PID.XXXXXXXX.tmp``, as
    ``tempfile`` completes the prefix). A live process's, another host's (on a shared folder) and another name's
    (``.NAME.x.HOST-...``) are left alone."""
    owner = f".{final.name}.{_HOST}-"
    for stale in final.parent.glob(f"{glob.escape(owner)}*.tmp"):
        m = re.fullmatch(r"(\d+)\.\w+\.tmp", stale.name[len(owner):])
        if m and not _alive(int(m.group(1))):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
    return f"{owner}{os.getpid()}."


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a temporary folder beside ``final``; on success replace ``final`` with it.

    On an exception the temporary folder is removed and ``final`` is untouched. Replacing takes two renames
    (``final`` aside to ``.NAME.old``, then the new folder in); an exception or Ctrl-C between them puts the old
    folder back, and a process killed between them is repaired by the next ``atomic_dir`` on ``final``. The
    temporary folder's name holds this host and process id, so the next ``atomic_dir`` on ``final`` also removes
    what a killed process left half-written (a checkpoint can be gigabytes), and never a live process's folder.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():  # a user's file: replacing it would delete it
        raise DataError(f"{final} is a file, not a folder: choose another output folder (or remove it yourself)")
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old")
    if old.is_dir() and not final.exists():  # a replace killed between its two renames: the old one is back
        os.replace(old, final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temp_prefix(final), suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir() and not final.exists():  # interrupted between the two renames
            os.replace(old, final)
        raise


def output_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` if a file can be written there, else DataError naming ``what`` (e.g. ``--json``): it is a folder,
    or lies under a file. Checked before the work whose result goes there, not after it."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder: give the path of a file")
    output_folder(path.parent, what, shown=path)
    return path


def output_folder(path: str | os.PathLike, what: str, *, shown: Path | None = None) -> Path:
    """``path`` if a folder can be made or used there, else DataError naming ``what``: it or a parent is a file."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise DataError(f"{what} {shown or path} cannot be written: {p} is a file, not a folder")
            break
    return path


def existing_artefact(folder: str | os.PathLike, kind: str, *, what: str | None = None, ignore: Iterable[str] = (),
                      broken_hint: str = "") -> dict | None:
    """Check ``folder`` before an :func:`atomic_dir` replaces it, whole: the manifest there if it is an earlier
    ``kind`` (a rebuild), None if ``folder`` is absent or empty (``ignore``: names that do not count, e.g. a lock
    file). Anything else is refused with :class:`DataError`, as that folder is not ours to delete; ``what`` names
    the kind for people, and ``broken_hint`` is appended when ``folder`` has a manifest that cannot be read."""
    folder = Path(folder)
    ignore = set(ignore)
    if not folder.exists() or (folder.is_dir() and not any(p.name not in ignore for p in folder.iterdir())):
        return None
    if folder.is_dir() and (folder / MANIFEST).is_file():
        try:
            manifest = read_manifest(folder)
        except DataError as e:
            raise DataError(f"{e}{broken_hint}") from None
        if manifest.get("kind") == kind:
            return manifest
    raise DataError(f"{folder} exists and is not a {what or kind}: writing there would delete it; choose another "
                    "output folder (or remove it yourself)")


def write_manifest(folder: str | os.PathLike, info: dict, *, checksum: bool = True) -> dict:
    """Write ``folder/manifest.json``: ``info`` plus the size and sha256 of every file in the folder."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = str(p.relative_to(folder))
            files[rel] = {"bytes": p.stat().st_size}
            if checksum:
                files[rel]["sha256"] = sha256_file(p)
    from lmlab import __version__

    manifest = {"lmlab_version": __version__, **info, "files": files}
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike, *, verify: bool = False) -> dict:
    """Read ``folder/manifest.json``; with ``verify`` check every listed file's size and checksum."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder} has no {MANIFEST}: it was not built by lmlab, or its build did not finish")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if verify:
        check_sizes(folder, manifest)
        for rel, meta in manifest.get("files", {}).items():
            if "sha256" in meta and sha256_file(folder / rel) != meta["sha256"]:
                raise DataError(f"{folder / rel} does not match its checksum in {path}: the file was changed or "
                                "corrupted")
    return manifest


def check_sizes(folder: str | os.PathLike, manifest: dict, *, only=None, skip_size=(),
                hint: str = "rebuild it") -> None:
    """The cheap half of verification, one ``stat`` per file: every file the manifest lists (or each of ``only``)
    exists at its recorded size. Catches a file truncated by a crash or a copy that did not finish."""
    folder = Path(folder)
    files = manifest.get("files", {})
    for rel in files if only is None else only:
        p, meta = folder / rel, files.get(rel, {})
        size = p.stat().st_size if p.is_file() else None
        if size is None or (rel not in skip_size and "bytes" in meta and size != meta["bytes"]):
            found = "not found" if size is None else f"{size} bytes, its manifest says {meta['bytes']}"
            raise DataError(f"{folder} is incomplete or corrupted ({rel} is missing or has the wrong size: {found}): "
                            f"{hint}")


def invocation(argv: list[str] | None = None) -> str:
    """How this script was run, for a results file's ``command``: ``[nice -n N ]python SCRIPT ARGS``.

    The niceness is read from the process (not assumed), so a recorded command says what really ran.
    """
    import shlex
    import sys

    nice = os.nice(0)
    args = sys.argv[1:] if argv is None else list(argv)
    return (f"nice -n {nice} " if nice else "") + "python " + shlex.join([sys.argv[0], *args])


@contextlib.contextmanager
def ctrl_c_held():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block has finished, then deliver it to the
    handler that was installed before: for state changes that must land together (an optimizer step and its step
    count; a document and the counts it adds to). Signal handlers can only be set from the main thread; elsewhere
    the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            if callable(previous):
                previous(signal.SIGINT, held[0])
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt
