"""The Parquet store: append, de-duplication, resume after an interrupt, atomicity, reading and filtering."""

import json
import os
import signal

import pytest

from lmlab.corpus import CorpusWriter, Document, StoreConfig, classify, open_corpus
from lmlab.corpus.document import document_id, normalise_text, text_hash
from lmlab.corpus.store import AddStatus, Corpus, TextCorpus
from lmlab.errors import DataError, ManifestMismatchError
from lmlab.io import read_manifest

MIT, GPL, PD = classify("MIT"), classify("GPL-2+"), classify("public-domain")


def doc(text: str, source: str, license=MIT, *, origin="test", group=None) -> Document:
    return Document.create(text, source, license, group=group or source, origin=origin)


def docs(n: int, *, origin="test", license=MIT, prefix="doc") -> list[Document]:
    return [doc(f"{prefix} {i}: " + "words " * 20, f"{origin}:{prefix}{i}", license, origin=origin,
                group=f"g{i % 3}") for i in range(n)]


def test_ids_are_stable_and_source_and_content_derived():
    a = doc("same text here, long enough", "s1")
    assert a.id == document_id("s1", "same text here, long enough") == doc("same text here, long enough", "s1").id
    assert a.id != doc("same text here, long enough", "s2").id
    assert a.id != doc("other text here, long enough", "s1").id
    assert text_hash("a  b\n\tc ") == text_hash("a b c") and normalise_text(" a\u0301 ") == "\u00e1"


def test_write_read_roundtrip_and_manifest(tmp_path):
    out = tmp_path / "c"
    written = docs(10) + docs(5, license=GPL, prefix="gpl")
    with CorpusWriter(out, command="lmlab corpus build --from test") as w:
        w.start_source("test")
        assert [w.add(d) for d in written] == [AddStatus.ADDED] * 15
        w.finish_source("test")
    corpus = open_corpus(out)
    assert isinstance(corpus, Corpus) and len(corpus) == 15
    assert {d.id: d for d in corpus} == {d.id: d for d in written}
    m = read_manifest(out, verify=True)  # every shard listed with size and sha256
    assert m["kind"] == "corpus" and m["schema_version"] == 1 and m["commands"] == ["lmlab corpus build --from test"]
    assert m["per_license_class"]["permissive_sw"]["documents"] == 10
    assert m["per_license_class"]["copyleft"]["bytes"] == sum(d.n_bytes for d in written[10:])
    assert m["per_source"]["test"]["documents"] == 15 and m["sources"]["test"]["status"] == "complete"
    assert all(f.startswith("shards/") for f in m["files"])


def test_ctrl_c_inside_add_commits_the_document_with_its_counts(tmp_path):
    class CtrlCOnAppend(list):
        def append(self, item):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after the counts were updated, before the buffering
            for _ in range(1000):  # Python handles a signal between bytecodes: give it some
                pass
            super().append(item)

    with pytest.raises(KeyboardInterrupt), CorpusWriter(tmp_path / "c") as w:
        w.add(docs(1)[0])
        w._buffer = CtrlCOnAppend(w._buffer)
        w.add(docs(2)[1])
    m = read_manifest(tmp_path / "c", verify=True)
    assert m["documents"] == len(list(open_corpus(tmp_path / "c"))) == 2 and m["per_source"]["test"]["documents"] == 2


def test_filters_get_and_permissive_view(tmp_path):
    with CorpusWriter(tmp_path / "c") as w:
        mixed = docs(4, origin="a") + docs(3, origin="b", license=GPL, prefix="g")
        for d in mixed + docs(2, origin="c", license=PD, prefix="p"):
            w.add(d)
    c = Corpus(tmp_path / "c")
    assert len(c.filter(license_classes="copyleft")) == 3
    assert len(c.filter(sources=["a", "c"])) == 6
    assert len(c.filter(sources="a", groups="g0")) == 2
    assert {d.license_class for d in c.permissive()} == {"permissive_sw", "public_domain"}
    assert len(list(c.filter(license_classes="copyleft").texts())) == 3
    one = next(iter(c))
    assert c.get(one.id) == one and c.get(one.id[:10]) == one
    with pytest.raises(DataError, match="no document"):
        c.get("ffffffffffff")
    with pytest.raises(DataError, match="unknown licence class"):
        c.filter(license_classes="free")


def test_exact_duplicates_and_empty_documents_are_dropped_and_counted(tmp_path):
    with CorpusWriter(tmp_path / "c", config=StoreConfig(min_chars=5)) as w:
        w.start_source("x")
        first = doc("Hello   world,\n again and again", "x:1", origin="x")
        assert w.add(first) == AddStatus.ADDED
        assert w.add(doc("Hello world, again and again  ", "x:2", origin="x")) == AddStatus.DUPLICATE
        assert w.add(doc("   \n", "x:3", origin="x")) == AddStatus.EMPTY
        assert w.add(first) == AddStatus.PRESENT  # the same document again: already stored, not a duplicate
        w.finish_source("x")
    m = read_manifest(tmp_path / "c")
    assert m["documents"] == 1 and m["duplicates"] == 1
    assert m["sources"]["x"]["duplicates"] == 1 and m["sources"]["x"]["empty"] == 1


def test_group_cap(tmp_path):
    with CorpusWriter(tmp_path / "c", config=StoreConfig(max_mb_per_group=250e-6)) as w:  # 250 bytes
        statuses = [w.add(doc(f"{i} " + "x" * 100, f"s{i}", group="big")) for i in range(4)]
        assert w.add(doc("y" * 100, "other", group="small")) == AddStatus.ADDED
    assert statuses == [AddStatus.ADDED, AddStatus.ADDED, AddStatus.OVER_CAP, AddStatus.OVER_CAP]
    assert read_manifest(tmp_path / "c")["sources"]["test"]["over_cap"] == 2


def test_shards_roll_over_and_append_in_a_second_session(tmp_path):
    out = tmp_path / "c"
    with CorpusWriter(out, config=StoreConfig(shard_mb=0.0005)) as w:  # ~500 bytes per shard
        for d in docs(10, origin="a"):
            w.add(d)
        w.finish_source("a")
    n_shards = len(read_manifest(out)["shards"])
    assert n_shards > 1
    with CorpusWriter(out, command="second") as w:
        assert w.is_complete("a")
        for d in docs(3, origin="b", prefix="more"):
            w.add(d)
        w.finish_source("b")
    m = read_manifest(out, verify=True)
    assert m["documents"] == 13 and len(m["shards"]) == n_shards + 1 and m["commands"] == ["second"]
    assert len(Corpus(out)) == 13


class Interrupt(Exception):
    pass


def test_an_interrupted_source_resumes_without_loss_or_repeats(tmp_path):
    out = tmp_path / "c"
    all_docs = docs(20, origin="src")

    def harvest(stop_after=None):
        for i, d in enumerate(all_docs):
            if stop_after is not None and i == stop_after:
                raise Interrupt
            yield d

    with pytest.raises(Interrupt), CorpusWriter(out, config=StoreConfig(shard_mb=0.001)) as w:
        w.start_source("src")
        for d in harvest(stop_after=12):
            w.add(d)
    m = read_manifest(out, verify=True)
    assert m["sources"]["src"]["status"] == "partial" and m["documents"] == 12  # the buffer was committed
    with CorpusWriter(out) as w:
        assert not w.is_complete("src")
        w.start_source("src")
        statuses = [w.add(d) for d in harvest()]
        w.finish_source("src")
    assert statuses.count(AddStatus.PRESENT) == 12 and statuses.count(AddStatus.ADDED) == 8
    m = read_manifest(out, verify=True)
    assert m["documents"] == 20 and m["sources"]["src"]["status"] == "complete"
    assert sorted(d.id for d in Corpus(out)) == sorted(d.id for d in all_docs)


def test_a_failing_buffer_does_not_mask_the_original_error(tmp_path):
    # a document Parquet cannot store (a lone surrogate) used to make __exit__ raise again, hiding the cause
    out = tmp_path / "c"
    with pytest.raises(Interrupt), CorpusWriter(out) as w:
        w.add(doc("bad \ud800 text, long enough", "s:bad"))
        raise Interrupt
    assert not list(out.rglob("*.parquet"))  # nothing was committed
    with CorpusWriter(out) as w:  # and the folder can still be built
        w.add(doc("good text, long enough", "s:good"))
    assert read_manifest(out, verify=True)["documents"] == 1


def test_a_shard_the_manifest_does_not_list_is_removed_on_open(tmp_path):
    out = tmp_path / "c"
    with CorpusWriter(out) as w:
        w.add(docs(1)[0])
    orphan = out / "shards" / "shard-00007.parquet"
    orphan.write_bytes(b"half-written")
    with CorpusWriter(out) as w:
        w.add(docs(2, prefix="next")[1])
    assert not orphan.exists()
    assert len(Corpus(out)) == 2 and read_manifest(out, verify=True)["documents"] == 2


def test_refuses_foreign_folders_and_other_schemas(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(DataError, match="not a corpus"):
        CorpusWriter(tmp_path / "notes")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"kind": "corpus", "schema_version": 0}))
    with pytest.raises(ManifestMismatchError, match="schema"):
        CorpusWriter(tmp_path / "old")
    with pytest.raises(ManifestMismatchError, match="schema"):
        Corpus(tmp_path / "old")
    with pytest.raises(DataError, match="does not exist"):
        open_corpus(tmp_path / "missing")


def test_open_corpus_reads_a_plain_folder_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document text")
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n{"text": "third"}\n')
    corpus = open_corpus(tmp_path)
    assert isinstance(corpus, TextCorpus)
    got = list(corpus)
    assert sorted(d.text for d in got) == ["first document text", "second", "third"]
    assert {d.license_class for d in got} == {"unknown"} and len({d.id for d in got}) == 3
    assert list(corpus.permissive()) == []  # unknown is never permissive
    mit = list(open_corpus(tmp_path, license="MIT").permissive())
    assert len(mit) == 3 and {d.license for d in mit} == {"MIT"}


def _built(tmp_path, n=12):
    out = tmp_path / "c"
    with CorpusWriter(out, config=StoreConfig(shard_mb=0.0005)) as w:
        w.start_source("test")
        for d in docs(n):
            w.add(d)
        w.finish_source("test")
    return out


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_truncated_or_missing_shard_is_a_data_error_on_read_and_resume(tmp_path, damage):
    out = _built(tmp_path)
    shard = sorted((out / "shards").iterdir())[0]
    if damage == "truncate":  # what a crash or an unfinished copy leaves: a shard shorter than the manifest says
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        shard.unlink()
    with pytest.raises(DataError, match="missing or has the wrong size"):
        list(Corpus(out).documents())
    with pytest.raises(DataError, match="missing or has the wrong size"):
        CorpusWriter(out)


def test_an_unreadable_shard_of_the_right_size_is_a_data_error(tmp_path):
    out = _built(tmp_path)
    shard = sorted((out / "shards").iterdir())[0]
    shard.write_bytes(b"\0" * shard.stat().st_size)  # same size, not Parquet
    with pytest.raises(DataError, match="cannot be read"):
        list(Corpus(out).documents())
    with pytest.raises(DataError, match="checksum"):
        Corpus(out, verify=True)


@pytest.mark.parametrize("edit", [lambda m: m.pop("shards"), lambda m: m.update(files=None), lambda m: m.clear()])
def test_a_manifest_from_another_version_missing_keys_is_a_mismatch(tmp_path, edit):
    out = _built(tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestMismatchError):
        Corpus(out)
    (out / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ManifestMismatchError):
        Corpus(out)
