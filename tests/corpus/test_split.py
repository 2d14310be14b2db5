"""Splits: no group in two splits, every document in exactly one, fractions near the targets, stratification."""

import logging

import pytest

from lmlab.corpus import Corpus, CorpusWriter, Document, SplitConfig, classify, split_corpus
from lmlab.corpus.split import SPLITS, assign_groups
from lmlab.errors import ConfigError
from lmlab.io import read_manifest

LICENSES = [classify("MIT"), classify("GPL-2+"), classify("public-domain")]


@pytest.fixture
def corpus_dir(tmp_path):
    out = tmp_path / "corpus"
    with CorpusWriter(out) as w:
        for g in range(60):
            lic = LICENSES[g % 3]
            for k in range(1 + g % 4):  # groups of 1-4 documents; a group's documents share one licence
                text = f"group {g} document {k} " + "text " * (20 + 7 * g)
                w.add(Document.create(text, f"src:{g}:{k}", lic, group=f"pkg-{g}", origin="test"))
    return out


@pytest.mark.parametrize("by", ["source", "license_class"])
def test_no_group_in_two_splits_and_every_document_once(corpus_dir, tmp_path, by):
    report = split_corpus(corpus_dir, tmp_path / "splits", config=SplitConfig(by=by, seed=1))
    seen: dict[str, str] = {}
    ids = []
    for s in SPLITS:
        for doc in Corpus(tmp_path / "splits" / s):
            assert seen.setdefault(doc.group, s) == s  # a group never appears in a second split
            ids.append(doc.id)
    original = sorted(d.id for d in Corpus(corpus_dir))
    assert sorted(ids) == original  # nothing lost, nothing repeated
    total = sum(report.bytes.values())
    assert abs(report.bytes["train"] / total - 0.8) < 0.05
    assert all(report.documents[s] > 0 for s in SPLITS)
    m = read_manifest(tmp_path / "splits" / "train", verify=True)
    assert m["split"]["by"] == by and m["split"]["name"] == "train" and m["documents"] == report.documents["train"]


def test_stratified_split_puts_every_class_in_every_split(corpus_dir, tmp_path):
    report = split_corpus(corpus_dir, tmp_path / "s", config=SplitConfig(by="license_class"))
    for s in SPLITS:
        assert set(report.bytes_per_class[s]) == {"permissive_sw", "copyleft", "public_domain"}
    for cls in ("permissive_sw", "copyleft", "public_domain"):
        total = sum(report.bytes_per_class[s][cls] for s in SPLITS)
        assert abs(report.bytes_per_class["train"][cls] / total - 0.8) < 0.08


def test_assignment_is_deterministic_and_seeded():
    sizes = {f"g{i}": 100 + i for i in range(50)}
    strata = dict.fromkeys(sizes, "x")
    a = assign_groups(sizes, strata, SplitConfig(seed=0))
    assert a == assign_groups(sizes, strata, SplitConfig(seed=0))
    assert a != assign_groups(sizes, strata, SplitConfig(seed=1))
    only_train = assign_groups(sizes, strata, SplitConfig(fractions=(1.0, 0.0, 0.0)))
    assert set(only_train.values()) == {"train"}


def test_bad_split_config():
    with pytest.raises(ConfigError, match="--by"):
        SplitConfig(by="licence")
    with pytest.raises(ConfigError, match="sum"):
        SplitConfig(fractions=(0.5, 0.2, 0.2))


def test_split_refuses_to_replace_the_corpus_or_a_foreign_folder(corpus_dir, tmp_path):
    from lmlab.errors import DataError

    with pytest.raises(DataError, match="would replace the corpus"):
        split_corpus(corpus_dir, corpus_dir)
    with pytest.raises(DataError, match="would replace the corpus"):
        split_corpus(corpus_dir, corpus_dir.parent)
    assert Corpus(corpus_dir, verify=True) is not None
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not only earlier splits"):
        split_corpus(corpus_dir, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    split_corpus(corpus_dir, tmp_path / "s")
    split_corpus(corpus_dir, tmp_path / "s")  # an earlier split is replaced


def test_non_finite_fractions_are_refused():
    with pytest.raises(ConfigError):
        SplitConfig(fractions=(float("nan"), 0.5, 0.5))
    with pytest.raises(ConfigError):
        SplitConfig(fractions=(float("inf"), 0.5, 0.5))


def test_a_tiny_corpus_warns_about_empty_splits_and_an_empty_one_is_an_error(tmp_path, caplog):
    from lmlab.errors import DataError

    tiny = tmp_path / "tiny"
    with CorpusWriter(tiny) as w:
        w.add(Document.create("one lonely document " * 3, "src:0", LICENSES[0], group="pkg-0", origin="t"))
    logger = logging.getLogger("lmlab.corpus")  # the CLI tests may have stopped it propagating to caplog's root
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="lmlab.corpus"):
            report = split_corpus(tiny, tmp_path / "s")
    finally:
        logger.removeHandler(caplog.handler)
    assert report.documents == {"train": 1, "validation": 0, "test": 0}
    assert "'validation' gets no documents" in caplog.text and "'test' gets no documents" in caplog.text
    empty = tmp_path / "empty"
    CorpusWriter(empty).close()
    with pytest.raises(DataError, match="no documents"):
        split_corpus(empty, tmp_path / "s2")


def test_splitting_a_corpus_with_unfinished_sources_warns(tmp_path, caplog):
    corpus = tmp_path / "c"
    with CorpusWriter(corpus) as w:
        for i, origin in enumerate(("done", "half")):
            w.add(Document.create(f"document {i} " * 5, f"src:{i}", LICENSES[0], group=f"pkg-{i}", origin=origin))
        w.finish_source("done")
    logger = logging.getLogger("lmlab.corpus")  # the CLI tests may have stopped it propagating to caplog's root
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="lmlab.corpus"):
            split_corpus(corpus, tmp_path / "s")
    finally:
        logger.removeHandler(caplog.handler)
    assert "sources not yet complete (half)" in caplog.text
