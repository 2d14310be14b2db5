"""Harvest the text and source files of Python wheels and sdists, licensed from their metadata.

``wheels:DIR`` reads every ``.whl``, ``.zip``, ``.tar.gz``/``.tgz`` in a folder (or one such file);
``pypi:NAME[,NAME]`` first fetches the named packages with ``pip download --no-deps`` into a temp dir.

The package licence comes from its core metadata (``METADATA`` in a wheel, ``PKG-INFO`` in an sdist), in
this order (PEP 639 first): ``License-Expression`` (SPDX), then ``Classifier: License ::`` entries (several
are combined with AND), then the free-text ``License`` field (a name or a whole licence text). A file
whose first lines carry ``SPDX-License-Identifier:`` gets that licence instead. Only text and source files
(:data:`TEXT_SUFFIXES`) up to ``max_file_kb`` are read; ``*.dist-info``/``*.egg-info`` are skipped. Splits
group documents by project (PEP 503 normalised name), so two versions of one project never straddle.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path, PurePosixPath

from lmlab.corpus.document import Document
from lmlab.corpus.harvest import formats
from lmlab.corpus.harvest.base import Harvester, Unreadable
from lmlab.corpus.licenses import UNKNOWN, License, LicenseClass, classify, from_classifiers, spdx_header

TEXT_SUFFIXES = {".py", ".pyi", ".pyx", ".pxd", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".js", ".ts",
                 ".java", ".md", ".rst", ".txt"}
ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class WheelConfig:
    max_file_kb: int = 512  # larger files are mostly generated tables or vendored bundles


@dataclass(frozen=True)
class PackageMetadata:
    name: str
    version: str
    license: License


def canonical_name(name: str) -> str:
    """PEP 503 normalisation: ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def metadata_license(fields) -> License:
    """License-Expression, then License classifiers, then the License field; ``unknown`` when none says."""
    if fields.get("License-Expression"):
        return classify(fields["License-Expression"])
    from_trove = from_classifiers(fields.get_all("Classifier") or [])
    if from_trove is not None and from_trove.license_class != LicenseClass.UNKNOWN:
        return from_trove
    text = (fields.get("License") or "").strip()
    if text and text.upper() not in ("UNKNOWN", "NONE"):
        return classify(text)
    return from_trove or UNKNOWN


def parse_metadata(raw: bytes, fallback_name: str) -> PackageMetadata:
    fields = HeaderParser().parsestr(raw.decode("utf-8", "replace"))
    return PackageMetadata(name=fields.get("Name") or fallback_name, version=fields.get("Version") or "",
                           license=metadata_license(fields))


class _Archive:
    """Uniform access to the members of a wheel/zip or a tarball: (name, size) listing and reads."""

    def __init__(self, path: Path):
        self.path = path
        try:
            if path.name.endswith((".whl", ".zip")):
                self.zip = zipfile.ZipFile(path)
                self.tar = None
                self.members = {i.filename: i.file_size for i in self.zip.infolist() if not i.is_dir()}
            else:
                self.zip = None
                self.tar = tarfile.open(path, "r:gz")
                self.members = {m.name: m.size for m in self.tar.getmembers() if m.isfile()}
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
            raise Unreadable("unreadable", str(e)) from None

    def read(self, name: str) -> bytes:
        try:
            if self.zip is not None:
                return self.zip.read(name)
            f = self.tar.extractfile(name)
            return f.read() if f is not None else b""
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, KeyError) as e:
            raise Unreadable("unreadable", str(e)) from None

    def close(self) -> None:
        (self.zip or self.tar).close()


def _metadata_member(members) -> str | None:
    for name in sorted(members):
        parts = PurePosixPath(name).parts
        if len(parts) == 2 and (parts[0].endswith(".dist-info") and parts[1] == "METADATA" or parts[1] == "PKG-INFO"):
            return name
    return None


class WheelHarvester(Harvester):
    """Text/source files of the wheels and sdists in a folder (or given as files)."""

    def __init__(self, path: str | Path, config: WheelConfig = WheelConfig(), *, origin: str | None = None):
        super().__init__(origin or f"wheels:{path}")
        self.path = Path(path)
        self.config = config

    def check(self) -> None:
        self.check_path(self.path, folder=None)  # a folder of archives, or one

    def archives(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        if not self.path.is_dir():
            self.skip("missing", str(self.path))
            return []
        return sorted(p for p in self.path.iterdir() if p.name.endswith(ARCHIVE_SUFFIXES))

    def documents(self) -> Iterator[Document]:
        for path in self.archives():
            try:
                archive = _Archive(path)
            except Unreadable as e:
                self.skip(e.reason, str(path), str(e))
                continue
            try:
                yield from self._archive_documents(path, archive)
            finally:
                archive.close()

    def _archive_documents(self, path: Path, archive: _Archive) -> Iterator[Document]:
        fallback = re.split(r"-\d", path.name, maxsplit=1)[0]
        meta_name = _metadata_member(archive.members)
        if meta_name is None:
            self.skip("no_metadata", str(path))
            meta = PackageMetadata(fallback, "", UNKNOWN)
        else:
            try:
                meta = parse_metadata(archive.read(meta_name), fallback)
            except Unreadable as e:  # a corrupt member (bad CRC...): the licence is unknown, the files may be fine
                self.skip(e.reason, f"{path}!{meta_name}", str(e))
                meta = PackageMetadata(fallback, "", UNKNOWN)
        project = canonical_name(meta.name)
        for name, size in sorted(archive.members.items()):
            member = PurePosixPath(name)
            if any(p.endswith((".dist-info", ".egg-info")) for p in member.parts) or member.name == "PKG-INFO":
                continue
            if member.suffix.lower() not in TEXT_SUFFIXES:
                continue
            where = f"{path}!{name}"
            if size > self.config.max_file_kb * 1024:
                self.skip("too_large", where, f"{size / 1e3:.0f} kB")
                continue
            try:
                text = formats.decode_text(archive.read(name))
            except Unreadable as e:
                self.skip(e.reason, where, str(e))
                continue
            license = spdx_header(text) or meta.license
            yield self.document(text, f"pypi:{project}@{meta.version}:{name}", license, group=f"pypi:{project}",
                                project=project, version=meta.version, archive=path.name, path=name,
                                package_license=meta.license.expression)


class PypiHarvester(WheelHarvester):
    """``pip download --no-deps NAME...`` into a temp dir, then harvest those archives like :class:`WheelHarvester`."""

    def __init__(self, names: list[str], config: WheelConfig = WheelConfig(), *, origin: str | None = None,
                 timeout_s: float = 600.0):
        super().__init__(Path(), config, origin=origin or "pypi:" + ",".join(names))
        self.names = names
        self.timeout_s = timeout_s

    def documents(self) -> Iterator[Document]:
        with tempfile.TemporaryDirectory(prefix="lmlab-pypi-") as tmp:
            for name in self.names:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, name]
                try:
                    subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=self.timeout_s)
                except subprocess.CalledProcessError as e:
                    lines = (e.stderr or "").strip().splitlines()
                    self.skip("download_failed", name, lines[-1] if lines else f"exit {e.returncode}")
                except subprocess.TimeoutExpired:
                    self.skip("download_failed", name, f"pip download took over {self.timeout_s:.0f} s")
            self.path = Path(tmp)
            yield from super().documents()
