"""Harvest Debian ``.deb`` files without installing them: ``apt-get download`` + ``dpkg-deb -x`` into a temp dir.

``deb:dict-gcide,sword-text-web`` downloads the named packages (``apt-get download``, which needs
``apt-get update`` to have run once); ``deb:/path/pkg.deb`` or ``deb:/folder/`` reads local files. Each
package is extracted to a temporary root (``dpkg-deb -x``), its control fields read with ``dpkg-deb -f``,
and its files handed to the same reader as installed packages
(:class:`~lmlab.corpus.harvest.debian.DebianPackageReader`: docs, man pages, dictd dictionaries, SWORD
Bibles, licences from the package's copyright file). Nothing is installed; the temp dirs are removed.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from lmlab.corpus.document import Document
from lmlab.corpus.harvest.base import Harvester
from lmlab.corpus.harvest.debian import DebianConfig, DebianPackageReader, PackageInfo
from lmlab.errors import MissingDependencyError


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise MissingDependencyError(name, f"apt-get install {package}")
    return path


class DebHarvester(Harvester):
    """Documents from ``.deb`` packages: names fetched with ``apt-get download``, or local ``.deb`` files/folders."""

    def __init__(self, targets: list[str], config: DebianConfig = DebianConfig(), *, origin: str | None = None,
                 timeout_s: float = 600.0):
        super().__init__(origin or "deb:" + ",".join(targets))
        self.targets = list(dict.fromkeys(targets))  # each once: a name given twice would be fetched twice
        self.config = config
        self.timeout_s = timeout_s

    def documents(self) -> Iterator[Document]:
        dpkg_deb = _tool("dpkg-deb", "dpkg")
        with tempfile.TemporaryDirectory(prefix="lmlab-deb-") as tmp:
            for deb in self._debs(Path(tmp)):
                root = Path(tmp) / "root" / deb.stem
                root.mkdir(parents=True)
                try:
                    fields = subprocess.run([dpkg_deb, "-f", str(deb), "Package", "Version", "Source", "Architecture"],
                                            capture_output=True, text=True, check=True, timeout=self.timeout_s)
                    subprocess.run([dpkg_deb, "-x", str(deb), str(root)], capture_output=True, text=True,
                                   check=True, timeout=self.timeout_s)
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                    self.skip("unreadable", str(deb), (getattr(e, "stderr", "") or str(e)).strip()[:200])
                    shutil.rmtree(root, ignore_errors=True)  # what it extracted; another .deb may have this name
                    continue
                info = PackageInfo.from_fields(_control_fields(fields.stdout))
                files = ["/" + str(p.relative_to(root)) for p in sorted(root.rglob("*"))
                         if p.is_file() and not p.is_symlink()]
                reader = DebianPackageReader(self, replace(self.config, root=root), prefix="deb")
                try:
                    yield from reader.documents(info, files)
                finally:
                    reader.close()
                    shutil.rmtree(root, ignore_errors=True)

    def _debs(self, tmp: Path) -> Iterator[Path]:
        for target in self.targets:
            path = Path(target)
            if target.endswith(".deb") or "/" in target:
                if path.is_dir():
                    yield from sorted(path.glob("*.deb"))
                elif path.is_file():
                    yield path
                else:
                    self.skip("missing", target)
                continue
            folder = tmp / "download" / target
            folder.mkdir(parents=True)
            try:
                subprocess.run([_tool("apt-get", "apt"), "download", "-q", target], cwd=folder, capture_output=True,
                               text=True, check=True, timeout=self.timeout_s)
            except subprocess.CalledProcessError as e:
                lines = (e.stderr or "").strip().splitlines()
                self.skip("download_failed", target, lines[-1] if lines else f"exit {e.returncode}")
                continue
            except subprocess.TimeoutExpired:
                self.skip("download_failed", target, f"apt-get download took over {self.timeout_s:.0f} s")
                continue
            yield from sorted(folder.glob("*.deb"))


def _control_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith(" "):
            fields[key.strip()] = value.strip()
    return fields
