"""The Debian harvesters on a fake filesystem root (fast, independent of what this machine has installed)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lmlab.corpus.harvest import formats
from lmlab.corpus.harvest.deb import DebHarvester
from lmlab.corpus.harvest.debian import DebianConfig, DebianHarvester, PackageLicenses, installed_packages, is_doc
from lmlab.corpus.harvest.formats import ManRenderer
from lmlab.errors import DataError


def harvest(root, **kw):
    h = DebianHarvester(DebianConfig(root=root, workers=2, **kw))
    return h, {d.meta["path"]: d for d in h.documents()}


def test_installed_packages_and_source_groups(debian_root):
    pkgs = {p.name: p for p in installed_packages(debian_root)}
    assert "removed" not in pkgs  # deinstalled: config files only
    assert pkgs["hello"].source == pkgs["hello-doc"].source == "hello-src"  # "Source: hello-src (1.0)"
    assert pkgs["dual"].source == "dual" and pkgs["hello"].version == "1.0-1"


def test_docs_and_man_pages_with_per_file_licences(debian_root):
    h, docs = harvest(debian_root)
    readme = docs["/usr/share/doc/hello/README.gz"]
    assert readme.text.startswith("Hello README") and readme.meta["kind"] == "doc"
    # README* matches the `doc/* README*` paragraph: its `or` licence takes the most permissive branch
    assert (readme.license, readme.license_class) == ("GFDL-1.3-or-later OR CC-BY-SA-4.0", "copyleft")
    assert docs["/usr/share/doc/hello/guide.txt"].license == "GPL-3.0-or-later"  # only `*` matches
    html = docs["/usr/share/doc/hello/manual.html"]
    assert html.license == "MIT" and "Manual" in html.text and "var x" not in html.text and "<p>" not in html.text
    man = docs["/usr/share/man/man1/hello.1.gz"]
    assert man.meta["kind"] == "man" and "friendly greeting program" in man.text and "\\f" not in man.text
    assert man.license == "GPL-3.0-or-later"
    assert readme.source == "debian:hello@1.0-1:/usr/share/doc/hello/README.gz"
    assert readme.group == docs["/usr/share/doc/hello-doc/README.md"].group == "debian-src:hello-src"
    for skipped in ("changelog.Debian.gz", "NEWS.gz", "logo.png"):
        assert f"/usr/share/doc/hello/{skipped}" not in docs
    assert "/usr/share/man/man1/hi.1.gz" not in docs  # a .so alias
    assert "/usr/share/man/de/man1/hello.1.gz" not in docs  # translations are not taken
    assert not any("gcloud" in p for p in docs)  # google-cloud-cli is excluded by default


def test_or_licences_missing_fields_and_free_form_copyright(debian_root):
    h, docs = harvest(debian_root)
    dual = docs["/usr/share/doc/dual/README"]
    assert (dual.license, dual.license_class) == ("Apache-2.0 OR GPL-2.0-or-later", "permissive_sw")
    extra = docs["/usr/share/doc/dual/extra/README.txt"]  # its Files paragraph has no License field
    assert extra.license_class == "unknown"
    assert docs["/usr/share/doc/plain/README"].license == "MIT"  # non-DEP-5, one licence named: unambiguous


def test_bad_input_is_counted_and_never_permissive(debian_root):
    h, docs = harvest(debian_root)
    for pkg in ("latin", "broken", "nocopy"):
        assert docs[f"/usr/share/doc/{pkg}/README"].license_class == "unknown"
    assert "/usr/share/doc/nolist/README" not in docs
    assert h.skipped["copyright_non_utf8"] == 1  # latin-1
    assert h.skipped["malformed_copyright"] == 2  # "broken", and "dual"'s paragraph without License
    assert h.skipped["no_copyright"] == 1 and h.skipped["no_file_list"] == 1
    assert h.skipped["binary"] == 1 and h.skipped["unreadable"] == 1  # notes.txt; the truncated man page
    assert any("notes.txt" in p for p in h.skip_examples["binary"])


def test_package_selection_and_gcloud_opt_in(debian_root):
    _, docs = harvest(debian_root, packages=("hello*",))
    assert {d.meta["package"] for d in docs.values()} == {"hello", "hello-doc"}
    _, docs = harvest(debian_root, packages=("google-cloud-cli",), exclude=())
    assert [d.meta["kind"] for d in docs.values()] == ["man"]


def test_missing_status_is_an_error(tmp_path):
    with pytest.raises(DataError, match="dpkg/status"):
        list(DebianHarvester(DebianConfig(root=tmp_path)).documents())


def test_package_licenses_lookup(fx):
    lic = PackageLicenses(fx.HELLO_COPYRIGHT)
    assert lic.for_path("src/main.c").expression == "GPL-3.0-or-later"
    assert lic.for_path("doc/intro.txt").expression == "GFDL-1.3-or-later OR CC-BY-SA-4.0"
    assert lic.for_path("index.html").expression == "MIT"
    assert lic.problem is None
    assert "no License field" in PackageLicenses(fx.DUAL_COPYRIGHT).problem
    assert PackageLicenses(None).for_path("x").license_class == "unknown"


def test_malformed_dep5_fields_and_globs_make_files_unknown(tmp_path, fx):
    # python-debian parses a Files paragraph's License and compiles its globs lazily: a tab continuation line
    # or a bad glob (a trailing backslash) raised out of the harvest instead of making the files unknown
    tab = f"Format: {fx.DEP5}\n\nFiles: *\nCopyright: x\nLicense: MIT\n\tPermission is hereby granted\n"
    glob = f"Format: {fx.DEP5}\n\nFiles: foo\\\nCopyright: x\nLicense: MIT\n\nFiles: *\nCopyright: x\nLicense: MIT\n"
    for text in (tab, glob):
        lic = PackageLicenses(text)
        assert lic.problem.startswith("does not parse") and lic.for_path("README").license_class == "unknown"
    fr = fx.FakeRoot(tmp_path / "root")
    long = "A readme long enough to be a document of its own, with words.\n" * 3
    fr.package("tabcr", {"/usr/share/doc/tabcr/README": long, "/usr/share/man/man1/tabcr.1.gz": fx.gz(fx.MAN_PAGE)},
               copyright=tab)
    fr.package("bscr", {"/usr/share/doc/bscr/README": long.replace("A readme", "The readme")}, copyright=glob)
    h, docs = harvest(fr.write_status())
    assert {d.meta["package"] for d in docs.values()} == {"tabcr", "bscr"} and len(docs) == 3
    assert {d.license_class for d in docs.values()} == {"unknown"}
    assert h.skipped["malformed_copyright"] == 2


def test_doc_selection():
    assert is_doc("/usr/share/doc/p/README.Debian")
    assert is_doc("/usr/share/doc/p/html/index.html")
    assert not is_doc("/usr/share/doc/p/changelog.gz")
    assert not is_doc("/usr/share/doc/p/examples/demo.txt")
    assert not is_doc("/usr/share/doc/p/copyright")
    assert not is_doc("/usr/bin/README")


def test_man_rendering_and_the_troff_fallback(fx):
    text = ManRenderer().render(fx.MAN_PAGE.encode())
    assert "NAME" in text and "friendly greeting program" in text and "-g, --greeting=TEXT" in text
    body = [ln.strip() for ln in text.splitlines() if "greeting" in ln and "HELLO" not in ln]
    assert body and not any("  " in ln for ln in body)  # left-adjusted: no justification runs inside lines
    plain = formats.strip_troff(fx.MAN_PAGE)
    assert "The hello program prints a friendly greeting" in plain and "\\f" not in plain and ".TH" not in plain
    assert formats.is_man_alias(b".so man1/hello.1\n") and not formats.is_man_alias(fx.MAN_PAGE.encode())


MDOC_PAGE = """.Dd $Mdocdate$
.Dt TOOL 1
.Os
.Sh NAME
.Nm tool
.Nd a page that gives no date of its own
.Sh DESCRIPTION
The tool does one thing.
"""
DAY_400 = 400 * 86400  # 1971-02-05 UTC


@pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff")
def test_man_pages_are_dated_by_the_caller_not_the_clock():
    """An mdoc page with ``.Dd $Mdocdate$`` is dated by ``render(date=...)``, so the same bytes render the same
    text on any day (groff would otherwise print today's date)."""
    r = ManRenderer()
    text = r.render(MDOC_PAGE.encode(), date=DAY_400)
    assert "February 5, 1971" in text and text == r.render(MDOC_PAGE.encode(), date=DAY_400)
    assert "February 6, 1971" in r.render(MDOC_PAGE.encode(), date=DAY_400 + 86400)


@pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff")
def test_harvested_man_pages_carry_the_file_date(tmp_path, fx):
    """The Debian harvester dates a page by its file's mtime (dpkg sets it from the package)."""
    fr = fx.FakeRoot(tmp_path / "root")
    fr.package("tool", {"/usr/share/man/man1/tool.1.gz": fx.gz(MDOC_PAGE)}, copyright=fx.PLAIN_MIT)
    root = fr.write_status()
    os.utime(root / "usr/share/man/man1/tool.1.gz", (DAY_400, DAY_400))
    _, docs = harvest(root)
    assert "February 5, 1971" in docs["/usr/share/man/man1/tool.1.gz"].text


def test_dictd_reader(tmp_path, fx):
    fr = fx.FakeRoot(tmp_path / "root")
    words = {"apple": "Apple, n. A fruit.\n", "bee": "Bee, n. An insect.\n", "cat": "Cat, n. An animal.\n"}
    body, index, offset = b"", [], 0
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def enc(n):
        return b64[n] if n < 64 else enc(n // 64) + b64[n % 64]

    for word, entry in {"00-database-info": "meta\n", **words}.items():
        data = entry.encode()
        index.append(f"{word}\t{enc(offset)}\t{enc(len(data))}")
        body += data
        offset += len(data)
    fr.package("dict-test", {"/usr/share/dictd/test.dict.dz": fx.gz(body),
                             "/usr/share/dictd/test.index": "\n".join(index) + "\n"},
               copyright="This dictionary is in the public domain.\n")
    _, docs = harvest(fr.write_status(), chunk_kb=1)
    (d,) = docs.values()
    assert d.text.split("\n\n") == [e.strip() for e in words.values()] and "meta" not in d.text
    assert d.license_class == "public_domain" and d.source.endswith("#apple..cat")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_deb_files_are_read_without_installing(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text("Package: tiny-doc\nVersion: 2.0-1\nSource: tiny\nArchitecture: all\n"
                                        "Maintainer: A <a@example.org>\nDescription: test\n")
    doc = pkg / "usr/share/doc/tiny-doc"
    doc.mkdir(parents=True)
    (doc / "README").write_text("Tiny documentation, long enough to be kept as a document.\n")
    (doc / "copyright").write_text("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
                                   "Files: *\nCopyright: 2024 A\nLicense: BSD-2-clause\n")
    deb = tmp_path / "tiny-doc_2.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(deb)], check=True,
                   capture_output=True)
    h = DebHarvester([str(deb), str(tmp_path / "missing.deb")])
    (d,) = list(h.documents())
    assert d.source == "deb:tiny-doc@2.0-1:/usr/share/doc/tiny-doc/README"
    assert (d.license, d.group) == ("BSD-2-Clause", "debian-src:tiny")
    assert h.skipped["missing"] == 1


@pytest.mark.slow
def test_real_packages_on_this_machine():
    """coreutils and bash as installed here (skipped where this is not a Debian system with them)."""
    if not Path("/var/lib/dpkg/status").is_file():
        pytest.skip("not a Debian system")
    names = {p.name for p in installed_packages(Path("/"))}
    if not {"coreutils", "bash"} <= names:
        pytest.skip("coreutils and bash are not both installed")
    h, docs = harvest(Path("/"), packages=("coreutils", "bash"))
    ls = docs["/usr/share/man/man1/ls.1.gz"]
    assert "list directory contents" in ls.text and ls.license_class == "copyleft"  # DEP-5: GPL-3+
    assert {d.meta["kind"] for d in docs.values()} >= {"man", "doc"}
    assert {d.group for d in docs.values()} == {"debian-src:coreutils", "debian-src:bash"}
    assert all(d.text.strip() and "\\fB" not in d.text for d in docs.values())  # fonts rendered, not escapes


def test_a_package_named_twice_or_a_failed_extraction_is_no_crash(tmp_path, monkeypatch):
    """deb:foo,foo used to stop the build with FileExistsError (a second download folder for foo), and so did a
    .deb that dpkg-deb could not read followed by another .deb of the same file name (its extraction root)."""
    import lmlab.corpus.harvest.deb as deb

    def fake_run(cmd, **kw):
        if cmd[1] == "-x":  # dpkg-deb -x DEB ROOT: extracts a little, then fails
            (Path(cmd[3]) / "partial").write_text("half")
            raise subprocess.CalledProcessError(2, cmd, stderr="dpkg-deb: error: unexpected end of file")
        if cmd[1] == "download":
            raise subprocess.CalledProcessError(100, cmd, stderr="E: Unable to locate package foo")
        return subprocess.CompletedProcess(cmd, 0, stdout="Package: x\n", stderr="")

    monkeypatch.setattr(deb, "_tool", lambda name, package: name)
    monkeypatch.setattr(deb.subprocess, "run", fake_run)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x_1_all.deb").write_bytes(b"!<arch>\n")
    h = DebHarvester(["foo", "foo", str(tmp_path / "a" / "x_1_all.deb"), str(tmp_path / "b" / "x_1_all.deb")])
    assert list(h.documents()) == []
    assert h.skipped == {"download_failed": 1, "unreadable": 2}
