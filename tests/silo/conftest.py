"""Small synthetic documents for the SILO tests (plain dataclasses: no dependency on lmlab.corpus)."""

from dataclasses import dataclass, field

import pytest


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    source: str
    license: str
    license_class: str
    meta: dict = field(default_factory=dict)


PLANTED = ("The zorblax quintessence of marmalade flutters under seventeen violet lanterns, "
           "while a glockenspiel named Humphrey recites the periodic table backwards.")


def make_docs(n: int = 12) -> list[Doc]:
    docs = []
    for i in range(n):
        text = f"Note {i}: package p{i % 4} prints {i * 13 % 97} lines; see manual section {i % 5}. " * 2
        cls, lic = ("copyleft", "GPL-2.0-only") if i % 2 else ("unknown", "NOASSERTION")
        docs.append(Doc(f"doc{i:02d}", text, f"debian:p{i % 4}@1.0:/usr/share/doc/p{i % 4}/f{i}", lic, cls,
                        {"group": f"p{i % 4}"}))
    docs.append(Doc("planted", PLANTED, "planted:secret", "LicenseRef-Proprietary", "unknown", {"group": "secret"}))
    return docs


@pytest.fixture(scope="session")
def docs():
    return make_docs()


@pytest.fixture(scope="session")
def doc_cls():
    return Doc


@pytest.fixture(scope="session")
def planted_text():
    return PLANTED


SMALL = dict(window=64, stride=32, docs_per_chunk=4, batch_size=4)


@pytest.fixture(scope="session")
def small_config():
    from lmlab.silo import DatastoreConfig

    return DatastoreConfig(**SMALL)


@pytest.fixture()
def store(tiny, docs, small_config, tmp_path):
    """A fresh Flat datastore over the synthetic documents (function scope: tests may opt documents out)."""
    from lmlab.silo import build_datastore

    return build_datastore(docs, tiny, tmp_path / "ds", small_config, progress=False)


def _no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.fixture
def disk_full():
    """A stand-in for a write that fails because the disk is full (monkeypatch it over write_json_atomic)."""
    return _no_space
