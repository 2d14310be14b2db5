"""Fixtures for the corpus tests: a fake Debian filesystem root with real-shaped package metadata."""

import gzip
from pathlib import Path
from types import SimpleNamespace

import pytest

DEP5 = "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"

# multi-paragraph DEP-5: a catch-all, a glob for docs, an `or` licence, a stand-alone License paragraph
HELLO_COPYRIGHT = f"""Format: {DEP5}
Upstream-Name: hello
Source: https://example.org/hello

Files: *
Copyright: 2001-2020 Example Authors
License: GPL-3+

Files: doc/* README*
Copyright: 2010 Doc Writer
License: GFDL-1.3+ or CC-BY-SA-4.0

Files: *.html
Copyright: 2015 Web Writer
License: Expat

Files: debian/*
Copyright: 2020 Maintainer
License: GPL-2+

License: GPL-3+
 This program is free software: see /usr/share/common-licenses/GPL-3.
"""

# DEP-5 with an `or` licence whose most permissive branch is permissive, and a Files paragraph missing License
DUAL_COPYRIGHT = f"""Format: {DEP5}

Files: *
Copyright: 2019 Someone
License: Apache-2.0 or GPL-2+

Files: extra/*
Copyright: 2019 Someone Else
"""

PLAIN_MIT = """This package was debianized by someone.

Copyright (c) 2005 Adam Jackson.

 Permission is hereby granted, free of charge, to any person obtaining
 a copy of this software and associated documentation files (the
 "Software"), to deal in the Software without restriction.
"""

MAN_PAGE = """.TH HELLO 1 "2024" "hello 2.10" "User Commands"
.SH NAME
hello \\- friendly greeting program
.SH SYNOPSIS
.B hello
[\\fIOPTION\\fR]...
.SH DESCRIPTION
The \\fBhello\\fR program prints a friendly greeting, and it can also say other things
when it is asked to, in several languages and styles.
.TP
.B \\-g, \\-\\-greeting=TEXT
use TEXT as the greeting message
"""


def status_paragraph(name: str, version: str = "1.0-1", source: str | None = None,
                     state: str = "install ok installed") -> str:
    lines = [f"Package: {name}", f"Status: {state}", "Architecture: amd64", f"Version: {version}"]
    if source:
        lines.insert(3, f"Source: {source}")
    return "\n".join(lines) + "\n"


class FakeRoot:
    """Build a Debian-like tree: packages with files, .list files and the dpkg status database."""

    def __init__(self, root: Path):
        self.root = root
        self.status: list[str] = []

    def package(self, name: str, files: dict[str, bytes | str], *, source: str | None = None, version="1.0-1",
                copyright: str | bytes | None = None, state="install ok installed", with_list=True) -> None:
        self.status.append(status_paragraph(name, version, source, state))
        if copyright is not None:
            files = {**files, f"/usr/share/doc/{name}/copyright": copyright}
        for path, content in files.items():
            local = self.root / path.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(content.encode() if isinstance(content, str) else content)
        if with_list:
            dirs = sorted({str(Path(p).parent) for p in files})
            info = self.root / "var/lib/dpkg/info"
            info.mkdir(parents=True, exist_ok=True)
            (info / f"{name}.list").write_text("\n".join(["/.", *dirs, *sorted(files)]) + "\n")

    def write_status(self) -> Path:
        status = self.root / "var/lib/dpkg/status"
        status.parent.mkdir(parents=True, exist_ok=True)
        status.write_text("\n".join(self.status))
        return self.root


def gz(text: str | bytes) -> bytes:
    return gzip.compress(text.encode() if isinstance(text, str) else text, mtime=0)


@pytest.fixture
def fx() -> SimpleNamespace:
    """The fixture texts and helpers, for tests that build their own trees (tests cannot import conftest)."""
    return SimpleNamespace(DEP5=DEP5, HELLO_COPYRIGHT=HELLO_COPYRIGHT, DUAL_COPYRIGHT=DUAL_COPYRIGHT,
                           PLAIN_MIT=PLAIN_MIT, MAN_PAGE=MAN_PAGE, FakeRoot=FakeRoot, gz=gz)


@pytest.fixture
def debian_root(tmp_path) -> Path:
    """A fake root: hello + hello-doc (one source package), a dual-licensed package, a non-DEP-5 MIT one,
    broken copyright files, an excluded gcloud package, a removed package and one without a file list."""
    fr = FakeRoot(tmp_path / "root")
    long = "This guide explains how to use hello in detail, with many examples and notes.\n" * 5
    fr.package("hello", {
        "/usr/bin/hello": b"\x7fELF\x00\x01binary",
        "/usr/share/doc/hello/README.gz": gz("Hello README: " + long),
        "/usr/share/doc/hello/changelog.Debian.gz": gz("hello (1.0-1) unstable; urgency=low"),
        "/usr/share/doc/hello/NEWS.gz": gz("news"),
        "/usr/share/doc/hello/guide.txt": "The hello guide. " + long,
        "/usr/share/doc/hello/manual.html": "<html><head><style>x{}</style></head><body><h1>Manual</h1>"
                                            f"<p>{long}</p><script>var x;</script></body></html>",
        "/usr/share/doc/hello/logo.png": b"\x89PNG\r\n\x1a\n\x00\x00",
        "/usr/share/doc/hello/notes.txt": b"\x00\x01\x02 binary pretending to be text",
        "/usr/share/man/man1/hello.1.gz": gz(MAN_PAGE),
        "/usr/share/man/man1/hi.1.gz": gz(".so man1/hello.1\n"),
        "/usr/share/man/de/man1/hello.1.gz": gz(MAN_PAGE.replace("friendly", "freundlich")),
    }, source="hello-src (1.0)", copyright=HELLO_COPYRIGHT)
    fr.package("hello-doc", {"/usr/share/doc/hello-doc/README.md": "# hello-doc\n" + long.replace("hello", "hi")},
               source="hello-src", copyright=HELLO_COPYRIGHT)
    fr.package("dual", {"/usr/share/doc/dual/README": "Dual licensed readme. " + long,
                        "/usr/share/doc/dual/extra/README.txt": "Extra files readme. " + long},
               copyright=DUAL_COPYRIGHT)
    fr.package("plain", {"/usr/share/doc/plain/README": "A plain package readme. " + long}, copyright=PLAIN_MIT)
    fr.package("latin", {"/usr/share/doc/latin/README": "Latin-1 copyright package. " + long},
               copyright="Copyright \xa9 1999 J\xf6rg, public domain".encode("latin-1"))
    fr.package("broken", {"/usr/share/doc/broken/README": "Broken copyright package. " + long},
               copyright=f"Format: {DEP5}\n\nFiles: *\nthis line is not a field\nLicense: MIT\n")
    fr.package("nocopy", {"/usr/share/doc/nocopy/README": "No copyright file at all. " + long})
    fr.package("badman", {"/usr/share/man/man1/bad.1.gz": b"\x1f\x8b\x08 truncated gzip"}, copyright="MIT? no.")
    fr.package("google-cloud-cli", {"/usr/share/man/man1/gcloud_x.1.gz": gz(MAN_PAGE)},
               copyright=f"Format: {DEP5}\n\nFiles: *\nCopyright: Google\nLicense: Apache-2.0\n")
    fr.package("removed", {"/usr/share/doc/removed/README": "gone " + long}, state="deinstall ok config-files",
               copyright=PLAIN_MIT)
    fr.package("nolist", {"/usr/share/doc/nolist/README": "no list " + long}, copyright=PLAIN_MIT, with_list=False)
    return fr.write_status()
