"""Harvest documentation and man pages of installed Debian packages, each with its licence.

For every installed package (``var/lib/dpkg/status`` under a filesystem ``root``, ``/`` by default) we read
its file list (``var/lib/dpkg/info/<pkg>.list``), its copyright file (``usr/share/doc/<pkg>/copyright``)
and take:

- docs under ``usr/share/doc/<pkg>/``: READMEs, guides, ``.txt/.md/.rst/.html`` (gzipped or not); not
  changelogs, NEWS, licence texts or binaries;
- man pages under ``usr/share/man/man*/`` (untranslated), rendered from troff to plain text
  (:class:`~lmlab.corpus.harvest.formats.ManRenderer`, in parallel subprocesses);
- dictd dictionaries (``usr/share/dictd/*.dict.dz``) and SWORD zText Bibles (``usr/share/sword``), in
  chunks of about ``chunk_kb``.

Licences: a machine-readable copyright file (DEP-5, parsed with python-debian's ``debian.copyright``)
gives each file the licence of the last ``Files:`` paragraph whose glob matches it (DEP-5 semantics).
Installed paths are not the source tree's paths, so we match a doc's path relative to its doc folder and
a man page's or data file's basename; paths no specific glob matches fall to the ``*`` paragraph, or to
the header's ``License:``. A free-form copyright file is classified by the licences it names
(:func:`~lmlab.corpus.licenses.from_license_text`): ``unknown`` unless unambiguous. Malformed,
non-UTF-8 or missing copyright files are counted and make the package's documents ``unknown``.

Splits group Debian binary packages by their source package (``Source:`` in the status file), so
``manpages`` and ``manpages-dev`` land in the same split. By default the ~16k generated
``google-cloud-cli`` man pages are excluded (``exclude``): they would dominate any permissive pool.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lmlab.corpus.document import Document
from lmlab.corpus.harvest import formats
from lmlab.corpus.harvest.base import Harvester, Unreadable
from lmlab.corpus.licenses import UNKNOWN, License, classify, from_license_text
from lmlab.errors import DataError

DOC_SUFFIXES = {".txt", ".md", ".rst", ".text", ".html", ".htm"}
DOC_NAMES = re.compile(r"^(readme|faq|guide|howto|intro|tutorial|manual|usage)", re.I)
SKIP_NAMES = re.compile(r"^(changelog|changes|news|history|copyright|copying|licen[cs]e|authors|thanks|credits"
                        r"|todo|bugs|release[-_]?notes)", re.I)
SKIP_DIRS = {"changelogs", "examples", "test", "tests"}
MAN_DIR = re.compile(r"^/usr/share/man/man[^/]+/[^/]+$")
MakeDocument = Callable[..., Document]  # (text, path, license, kind, part="") -> Document


@dataclass(frozen=True)
class DebianConfig:
    root: Path = Path("/")  # filesystem root (tests pass a fake tree)
    packages: tuple[str, ...] | None = None  # only these (fnmatch patterns); None: every installed package
    exclude: tuple[str, ...] = ("google-cloud-cli*",)  # DATA.md: ~16k generated gcloud pages, 64 MB
    docs: bool = True
    man_pages: bool = True
    data: bool = True  # dictd dictionaries and SWORD Bibles
    max_file_mb: float = 16.0  # larger single files are skipped (``too_large``)
    chunk_kb: int = 64  # dictionary entries per document, by size
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # parallel man-page renderers
    renderer: formats.ManRenderer = formats.ManRenderer()


@dataclass(frozen=True)
class PackageInfo:
    name: str
    version: str
    source: str  # the source package: what splits group by
    architecture: str = "all"

    @classmethod
    def from_fields(cls, fields) -> PackageInfo:
        name = fields.get("Package", "").strip()
        source = (fields.get("Source") or name).split("(")[0].strip() or name
        return cls(name=name, version=fields.get("Version", "").strip(), source=source,
                   architecture=fields.get("Architecture", "all").strip())


def installed_packages(root: Path) -> list[PackageInfo]:
    """Installed packages from ``var/lib/dpkg/status`` (what ``dpkg-query -W -f='${Package} ${Source}'`` lists)."""
    from debian.deb822 import Deb822

    status = root / "var/lib/dpkg/status"
    if not status.is_file():
        raise DataError(f"{status} does not exist: is {root} the root of a Debian system?")
    packages = []
    with open(status, encoding="utf-8", errors="replace") as f:
        for para in Deb822.iter_paragraphs(f, use_apt_pkg=False):
            if para.get("Status", "").split()[-1:] == ["installed"] and para.get("Package"):
                packages.append(PackageInfo.from_fields(para))
    return sorted(packages, key=lambda p: p.name)


class PackageLicenses:
    """Licence lookup for the files of one package, from its ``copyright`` file (see the module docstring)."""

    def __init__(self, copyright_text: str | None):
        self.dep5 = None
        self.fallback: License = UNKNOWN
        self.problem: str | None = None
        if copyright_text is None:
            return
        from debian.copyright import Copyright, NotMachineReadableError

        is_dep5 = re.match(r"\s*Format:", copyright_text) is not None
        try:
            with _quiet("debian"):
                self.dep5 = Copyright(copyright_text.splitlines(keepends=True), strict=False)
        except NotMachineReadableError:
            if is_dep5:
                self.problem = "says it is DEP-5 (Format:) but does not parse"
            else:
                self.fallback = from_license_text(copyright_text)
            return
        except (ValueError, KeyError, TypeError) as e:
            self.problem = f"does not parse: {e}"
            return
        # python-debian parses fields and compiles Files globs lazily (MachineReadableFormatError, a
        # ValueError): read them all now, so a bad one makes every file unknown instead of failing a lookup
        try:
            header = self.dep5.header.license
            fallback = classify(header.synopsis) if header is not None and header.synopsis else UNKNOWN
            paragraphs = list(self.dep5.all_files_paragraphs())
            no_license = any(p.license is None or not p.license.synopsis for p in paragraphs)
            for p in paragraphs:
                p.files_pattern()
        except (ValueError, KeyError, TypeError) as e:
            self.dep5 = None
            self.problem = f"does not parse: {e}"
            return
        self.fallback = fallback
        if no_license:
            self.problem = "a Files paragraph has no License field (its files are unknown)"

    def for_path(self, path: str) -> License:
        if self.dep5 is None:
            return self.fallback
        try:
            para = self.dep5.find_files_paragraph(path)
        except (ValueError, KeyError, TypeError):  # checked in __init__; never let a lookup stop the harvest
            return UNKNOWN
        if para is None:
            return self.fallback
        if para.license is None or not para.license.synopsis:
            return UNKNOWN
        return classify(para.license.synopsis)


@contextlib.contextmanager
def _quiet(name: str):
    """Raise a logger's level for a block (python-debian warns about every old ``Format:`` URL)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def is_doc(path: str) -> bool:
    """A README, guide or text/HTML page in the package's doc folder (no changelogs, licences or binaries)."""
    p = PurePosixPath(path)
    if not path.startswith("/usr/share/doc/") or p.name == "copyright":
        return False
    if SKIP_DIRS & set(p.parts[4:-1]) or SKIP_NAMES.match(p.name):
        return False
    name = p.name.removesuffix(".gz")
    return PurePosixPath(name).suffix.lower() in DOC_SUFFIXES or bool(DOC_NAMES.match(name))


class DebianPackageReader:
    """Turn the files of one package (under ``config.root``) into Documents; shared by the two Debian harvesters."""

    def __init__(self, harvester: Harvester, config: DebianConfig, *, prefix: str):
        self.h = harvester
        self.config = config
        self.prefix = prefix  # "debian" or "deb": the first part of each document's source
        self._pool = ThreadPoolExecutor(max_workers=max(1, config.workers))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _local(self, path: str) -> Path:
        return self.config.root / path.lstrip("/")

    def licenses(self, pkg: PackageInfo) -> PackageLicenses:
        path = self._local(f"/usr/share/doc/{pkg.name}/copyright")
        if not path.is_file():
            self.h.skip("no_copyright", str(path), "documents are licensed unknown")
            return PackageLicenses(None)
        try:
            text = formats.decode_text(path.read_bytes())
        except Unreadable as e:
            self.h.skip(f"copyright_{e.reason}", str(path), "documents are licensed unknown")
            return PackageLicenses(None)
        except OSError as e:
            self.h.skip("copyright_unreadable", str(path), str(e))
            return PackageLicenses(None)
        licenses = PackageLicenses(text)
        if licenses.problem:
            self.h.skip("malformed_copyright", str(path), f"{licenses.problem}; documents are licensed unknown")
        return licenses

    def documents(self, pkg: PackageInfo, files: Iterable[str]) -> Iterator[Document]:
        files = sorted(set(files))
        licenses = self.licenses(pkg)
        group = f"debian-src:{pkg.source}"
        c = self.config

        def make(text: str, path: str, license: License, kind: str, part: str = "") -> Document:
            source = f"{self.prefix}:{pkg.name}@{pkg.version}:{path}{'#' + part if part else ''}"
            return self.h.document(text, source, license, group=group, package=pkg.name, version=pkg.version,
                                   source_package=pkg.source, path=path, kind=kind)

        if c.docs:
            doc_root = f"/usr/share/doc/{pkg.name}/"
            for path in files:
                if not is_doc(path) or not self._regular(path):
                    continue
                try:
                    text = formats.decode_text(formats.read_maybe_gz(self._checked_size(path)))
                except Unreadable as e:
                    self.h.skip(e.reason, str(self._local(path)), str(e))
                    continue
                rel = path.removeprefix(doc_root).removesuffix(".gz")
                if rel.lower().endswith((".html", ".htm")):
                    text = formats.html_to_text(text)
                yield make(text, path, licenses.for_path(rel), "doc")
        if c.man_pages:
            pages = [p for p in files if MAN_DIR.match(p) and self._regular(p)]
            for path, result in zip(pages, self._pool.map(self._render, pages), strict=True):
                if isinstance(result, Unreadable):
                    self.h.skip(result.reason, str(self._local(path)), str(result))
                elif result:
                    name = PurePosixPath(path).name.removesuffix(".gz")
                    yield make(result, path, licenses.for_path(name), "man")
        if c.data:
            yield from self._dictd(files, licenses, make)
            yield from self._sword(files, licenses, make)

    def _regular(self, path: str) -> bool:
        local = self._local(path)
        return local.is_file() and not local.is_symlink()

    def _checked_size(self, path: str) -> Path:
        local = self._local(path)
        if local.stat().st_size > self.config.max_file_mb * 1e6:
            raise Unreadable("too_large", f"over {self.config.max_file_mb:g} MB")
        return local

    def _render(self, path: str) -> str | Unreadable:
        try:
            local = self._checked_size(path)
            data = formats.read_maybe_gz(local)
            return "" if formats.is_man_alias(data) else self.config.renderer.render(data, date=local.stat().st_mtime)
        except Unreadable as e:
            return e

    def _chunks(self, items: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
        """Consecutive (name, text) items joined into documents of about ``chunk_kb``: (first..last name, text)."""
        names: list[str] = []
        texts: list[str] = []
        size = 0
        for name, text in items:
            names.append(name)
            texts.append(text.strip())
            size += len(text)
            if size >= self.config.chunk_kb * 1024:
                yield f"{names[0]}..{names[-1]}", "\n\n".join(texts)
                names, texts, size = [], [], 0
        if texts:
            yield f"{names[0]}..{names[-1]}", "\n\n".join(texts)

    def _dictd(self, files: list[str], licenses: PackageLicenses, make: MakeDocument) -> Iterator[Document]:
        for path in files:
            if not (path.startswith("/usr/share/dictd/") and path.endswith(".dict.dz")):
                continue
            index = self._local(path.removesuffix(".dict.dz") + ".index")
            try:
                entries = formats.dictd_entries(index, self._local(path))
                for span, text in self._chunks(entries):
                    yield make(text, path, licenses.for_path(PurePosixPath(path).name), "dictionary", span)
            except Unreadable as e:
                self.h.skip(e.reason, str(self._local(path)), str(e))

    def _sword(self, files: list[str], licenses: PackageLicenses, make: MakeDocument) -> Iterator[Document]:
        for path in files:
            if not (path.startswith("/usr/share/sword/mods.d/") and path.endswith(".conf")):
                continue
            conf = formats.read_sword_conf(self._local(path))
            if conf.get("ModDrv", "").lower() != "ztext" or conf.get("CipherKey"):
                self.h.skip("unsupported", str(self._local(path)), f"SWORD driver {conf.get('ModDrv')!r}")
                continue
            data_path = "/usr/share/sword/" + conf.get("DataPath", "").removeprefix("./").rstrip("/")
            try:
                for book, text in formats.sword_books(self._local(data_path)):
                    yield make(text, data_path, licenses.for_path(PurePosixPath(data_path).name), "bible", book)
            except Unreadable as e:
                self.h.skip(e.reason, str(self._local(data_path)), str(e))


class DebianHarvester(Harvester):
    """Docs, man pages and text data of the Debian packages installed under ``config.root``."""

    def __init__(self, config: DebianConfig = DebianConfig(), *, origin: str = "debian"):
        super().__init__(origin)
        self.config = config

    def selected(self) -> list[PackageInfo]:
        c = self.config
        return [p for p in installed_packages(c.root)
                if (c.packages is None or any(fnmatch.fnmatchcase(p.name, pat) for pat in c.packages))
                and not any(fnmatch.fnmatchcase(p.name, pat) for pat in c.exclude)]

    def file_list(self, pkg: PackageInfo) -> list[str] | None:
        info = self.config.root / "var/lib/dpkg/info"
        for name in (f"{pkg.name}.list", f"{pkg.name}:{pkg.architecture}.list"):
            if (info / name).is_file():
                text = (info / name).read_text(encoding="utf-8", errors="replace")
                return [ln for ln in text.splitlines() if ln.startswith("/")]
        return None

    def documents(self) -> Iterator[Document]:
        reader = DebianPackageReader(self, self.config, prefix="debian")
        try:
            for pkg in self.selected():
                files = self.file_list(pkg)
                if files is None:
                    self.skip("no_file_list", str(self.config.root / f"var/lib/dpkg/info/{pkg.name}.list"))
                    continue
                yield from reader.documents(pkg, files)
        finally:
            reader.close()
