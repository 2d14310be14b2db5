"""Datastore: keys/values/provenance, manifest, resume, shards, refusal of another model, IVF-PQ, opt-out."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.errors import ConfigError, DataError, ManifestMismatchError
from lmlab.silo import Datastore, DatastoreConfig, build_datastore, merge_shards

torch.set_num_threads(1)


def _stream_len(tok, docs):
    return sum(len(tok(d.text, add_special_tokens=False)["input_ids"]) for d in docs)


def test_values_and_provenance_follow_the_documents(store, tiny, docs):
    tok = tiny.tokenizer
    m = store.manifest
    assert m["kind"] == "silo-datastore" and m["key_point"] == "final" and m["dim"] == 32
    assert m["documents"] == len(docs) == len(store.docs)
    # every chunk of c documents adds c-1 EOS separators and loses its first token (never a target)
    n_chunks = -(-len(docs) // 4)
    assert m["entries"] == _stream_len(tok, docs) + (len(docs) - n_chunks) - n_chunks == len(store)
    for e in range(0, store.n_entries, 37):
        d = store.docs[store.doc[e]]
        ids = tok(docs[store.doc[e]].text, add_special_tokens=False)["input_ids"]
        assert d.id == docs[store.doc[e]].id and d.license_class == docs[store.doc[e]].license_class
        off = store.offset[e]
        expected = ids[off] if off < len(ids) else tok.eos_token_id
        assert store.values[e] == expected


def test_keys_are_the_final_hidden_states(store, tiny, docs):
    tok = tiny.tokenizer
    ids = tok(docs[0].text, add_special_tokens=False)["input_ids"][:40]  # inside the first window of chunk 0
    with torch.no_grad():
        h = tiny.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    # entry j of chunk 0 is the target ids[j + 1], keyed by the state at position j
    np.testing.assert_allclose(np.asarray(store.keys[:39], np.float32), h[:39].numpy(), rtol=2e-3, atol=2e-3)


def test_hook_key_point_is_recorded_and_used(tiny, docs, tmp_path):
    cfg = DatastoreConfig(key_point="model.layers.1.mlp:input", window=64, stride=32, docs_per_chunk=4)
    ds = build_datastore(docs[:4], tiny, tmp_path / "ds", cfg, progress=False)
    assert ds.manifest["key_point"] == "model.layers.1.mlp:input" and ds.dim == 32
    from lmlab.lm.hooks import capture

    ids = tiny.tokenizer(docs[0].text, add_special_tokens=False)["input_ids"][:20]
    with capture(tiny.model, "model.layers.1.mlp", what="input") as cap, torch.no_grad():
        tiny.model(torch.tensor([ids]))
    np.testing.assert_allclose(np.asarray(ds.keys[:19], np.float32), cap["model.layers.1.mlp"][0, :19].numpy(),
                               rtol=2e-3, atol=2e-3)
    with pytest.raises(ConfigError):
        DatastoreConfig(key_point="nonsense").validate()


def test_manifest_checksums_and_model_mismatch_refused(store, tiny):
    from lmlab.lm import models
    from lmlab.lm.tokenizer import train_bpe

    Datastore.load(store.folder, tiny, verify=True)
    other = models.load("tiny:micro", seed=1)
    with pytest.raises(ManifestMismatchError, match="built with model"):
        Datastore.load(store.folder, other)
    tok = train_bpe(["hello world"] * 20, vocab_size=300)
    other_tok = models.load("tiny:micro", seed=0, tokenizer=tok)
    with pytest.raises(ManifestMismatchError):
        Datastore.load(store.folder, other_tok)
    (store.folder / "values.npy").write_bytes(b"corrupt")
    with pytest.raises(DataError, match="size|checksum"):
        Datastore.load(store.folder, verify=True)


class Interrupt(Exception):
    pass


def _interrupting(docs, after):
    for i, d in enumerate(docs):
        if i == after:
            raise Interrupt
        yield d


def test_interrupted_build_resumes_without_duplicates(tiny, docs, small_config, tmp_path):
    ref = build_datastore(docs, tiny, tmp_path / "ref", small_config, progress=False)
    out = tmp_path / "ds"
    with pytest.raises(Interrupt):
        build_datastore(_interrupting(docs, 9), tiny, out, small_config, progress=False)
    parts = sorted(p.name for p in (tmp_path / "ds.parts").glob("part-*.npz"))
    assert parts == ["part-0000000.npz", "part-0000001.npz"] and not out.exists()
    mtime = (tmp_path / "ds.parts" / parts[0]).stat().st_mtime_ns
    ds = build_datastore(docs, tiny, out, small_config, progress=False)
    assert not (tmp_path / "ds.parts").exists()
    assert ds.n_entries == ref.n_entries
    np.testing.assert_array_equal(ds.values, ref.values)
    np.testing.assert_array_equal(ds.doc, ref.doc)
    np.testing.assert_array_equal(np.asarray(ds.keys), np.asarray(ref.keys))
    assert [d.id for d in ds.docs] == [d.id for d in ref.docs]
    del mtime


def test_resume_with_other_settings_is_refused(tiny, docs, small_config, tmp_path):
    with pytest.raises(Interrupt):
        build_datastore(_interrupting(docs, 5), tiny, tmp_path / "ds", small_config, progress=False)
    with pytest.raises(ManifestMismatchError, match="other settings"):
        build_datastore(docs, tiny, tmp_path / "ds", DatastoreConfig(window=32, stride=16, docs_per_chunk=4),
                        progress=False)


def test_shards_merge_into_the_unsharded_datastore(tiny, docs, small_config, tmp_path):
    ref = build_datastore(docs, tiny, tmp_path / "ref", small_config, progress=False)
    for i in range(3):
        build_datastore(docs, tiny, tmp_path / f"s{i}", small_config, shard=(i, 3), progress=False)
    with pytest.raises(DataError, match="every shard"):
        merge_shards([tmp_path / "s0", tmp_path / "s1"], tmp_path / "bad", small_config, progress=False)
    ds = merge_shards([tmp_path / f"s{i}" for i in (2, 0, 1)], tmp_path / "merged", small_config, progress=False)
    np.testing.assert_array_equal(ds.values, ref.values)
    np.testing.assert_array_equal(np.asarray(ds.keys), np.asarray(ref.keys))
    xq = np.asarray(ref.keys[:5], np.float32)
    np.testing.assert_array_equal(ds.search(xq, 4).I, ref.search(xq, 4).I)


def test_ivfpq_with_exact_rescoring(tiny, docs, tmp_path, store):
    cfg = DatastoreConfig(window=64, stride=32, docs_per_chunk=4, factory="IVF8,PQ4x4", nprobe=8)
    ds = build_datastore(docs, tiny, tmp_path / "ivf", cfg, progress=False)
    assert ds.stats()["index_bytes_per_entry"] < store.stats()["index_bytes_per_entry"]
    xq = np.asarray(ds.keys[100:110], np.float32)
    approx = ds.search(xq, 8)
    exact = ds.search(xq, 8, rescore=True)
    np.testing.assert_array_equal(approx.I, exact.I)
    keys = np.asarray(ds.keys, np.float32)
    want = ((xq[:, None] - keys[exact.I]) ** 2).sum(-1)
    np.testing.assert_allclose(exact.D, want, rtol=1e-4, atol=1e-5)
    self_hit = exact.I == np.arange(100, 110)[:, None]
    assert self_hit.any() and np.all(exact.D[self_hit] <= 1e-6)  # a stored key is at exact distance 0 from itself
    assert not np.allclose(approx.D, exact.D)  # PQ distances are approximate
    with pytest.raises(ConfigError, match="training vectors"):
        build_datastore(docs[:1], tiny, tmp_path / "tiny_ivf", DatastoreConfig(
            window=64, stride=32, factory="IVF4096,PQ8"), progress=False)


def test_optout_persists_and_removed_docs_never_come_back(store, tiny):
    target = store.docs.index(next(d for d in store.docs if d.id == "planted"))
    planted_entries = np.flatnonzero(store.doc == target)
    xq = np.asarray(store.keys[planted_entries], np.float32)
    assert np.isin(store.search(xq, 5).I, planted_entries).any()
    old_index = (store.folder / "index.faiss").read_bytes()
    rep = store.optout(doc_ids=["planted"], sources=["p1"])  # a doc id and a group (package)
    assert rep.documents == 1 + 3 and rep.entries > len(planted_entries)
    gone = np.flatnonzero(store.removed_docs[store.doc])
    assert not np.isin(store.search(xq, 50).I, gone).any()
    again = Datastore.load(store.folder, tiny, verify=True)  # a restart keeps it; checksums still hold
    assert len(again) == len(store) and not np.isin(again.search(xq, 50).I, gone).any()
    assert json.loads((store.folder / "manifest.json").read_text())["tombstones"]["doc_ids"] == ["planted"]
    # a crash after the manifest but before the index rename: the tombstones are re-applied on load
    (store.folder / "index.faiss").write_bytes(old_index)
    crashed = Datastore.load(store.folder)
    assert len(crashed) == len(store) and not np.isin(crashed.search(xq, 50).I, gone).any()
    assert again.optout(license_classes=["copyleft"]).documents > 0
    assert {again.docs[i].license_class for i in np.unique(again.doc[again.search(xq, 50).I.ravel()])} == {"unknown"}
    with pytest.raises(DataError, match="no datastore document"):
        again.optout(doc_ids=["no-such-doc"])
    with pytest.raises(ConfigError):
        again.optout()
    for everything in ("*", "", "**"):  # opt-outs are permanent: a pattern that matches all is refused
        with pytest.raises(ConfigError, match="match every document"):
            again.optout(sources=["debian:p1@1", everything])


def test_optout_interrupted_after_its_manifest_still_verifies(store, monkeypatch):
    """Ctrl-C between the manifest write and the index rename: the rename is finished, so --verify passes."""
    from lmlab.silo import datastore as ds_mod

    real = os.replace  # (os is shared: this also wraps the manifest's atomic write, which passes through)
    calls = []

    def interrupted(src, dst):
        if Path(dst).name == "index.faiss":
            calls.append(dst)
            if len(calls) == 1:  # the opt-out's rename of the new index: interrupted
                raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(ds_mod.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.optout(doc_ids=["planted"])
    monkeypatch.setattr(ds_mod.os, "replace", real)
    again = Datastore.load(store.folder, verify=True)
    assert again.removed_docs.sum() == 1 and len(again) == len(store)
    assert not (store.folder / ".index.faiss.tmp").exists()


def test_load_finishes_an_optout_killed_before_its_index_rename(store):
    """SIGKILL between the manifest write and the rename leaves the new index beside the old one; loading (with
    --verify) renames it into place. A stale one (killed before the manifest) is removed."""
    folder = store.folder
    old_index = (folder / "index.faiss").read_bytes()
    store.optout(doc_ids=["planted"])
    new_index = (folder / "index.faiss").read_bytes()
    (folder / ".index.faiss.tmp").write_bytes(new_index)  # the state a kill at that point leaves
    (folder / "index.faiss").write_bytes(old_index)
    again = Datastore.load(folder, verify=True)
    assert (folder / "index.faiss").read_bytes() == new_index and not (folder / ".index.faiss.tmp").exists()
    assert len(again) == len(store)
    (folder / ".index.faiss.tmp").write_bytes(b"half an index")  # killed while writing it: stale
    Datastore.load(folder, verify=True)
    assert not (folder / ".index.faiss.tmp").exists() and (folder / "index.faiss").read_bytes() == new_index


def test_source_prefix_optout(store):
    rep = store.optout(sources=["debian:p2@*"])
    assert rep.documents == 3
    assert all(store.removed_docs[i] == store.docs[i].source.startswith("debian:p2@") for i in range(len(store.docs)))
    with pytest.raises(ConfigError, match="unknown licence class 'nope'"):  # not "no document matches", nor kept
        store.optout(doc_ids=["doc00"], license_classes=["nope"])
    assert "nope" not in json.loads((store.folder / "manifest.json").read_text())["tombstones"]["license_classes"]


def test_bad_shard_and_empty_corpus(tiny, docs, small_config, tmp_path, doc_cls):
    with pytest.raises(ConfigError):
        build_datastore(docs, tiny, tmp_path / "x", small_config, shard=(3, 2))
    for bad in (0, -1):  # an IVF index that probes no list finds nothing; -3 overflowed in faiss
        with pytest.raises(ConfigError, match="nprobe must be at least 1"):
            DatastoreConfig(factory="IVF16,Flat", nprobe=bad)
    with pytest.raises(DataError, match="no tokens"):
        build_datastore([doc_cls("e", "", "s", "MIT", "permissive_sw")], tiny, tmp_path / "e", small_config,
                        progress=False)
    shutil.rmtree(tmp_path / "e.parts", ignore_errors=True)


def test_auto_factory_by_size(tiny, docs, small_config, tmp_path):
    from dataclasses import replace

    from lmlab.silo import build_datastore
    from lmlab.silo.datastore import auto_factory

    assert auto_factory(1_000, 64) == "Flat"
    assert auto_factory(1_000_000, 64) == "IVF4096,Flat"  # 4 sqrt(1e6) = 4000 -> 4096
    assert auto_factory(20_000_000, 576) == "IVF16384,PQ64"
    assert auto_factory(20_000_000, 96) == "IVF16384,PQ48"  # the largest divisor of 96 up to 64
    ds = build_datastore(docs, tiny, tmp_path / "auto", replace(small_config, factory="auto"), progress=False)
    assert ds.manifest["factory"] == "Flat" and ds.stats()["factory"] == "Flat"


def test_ivf_probes_enough_lists_for_large_k(tiny, docs, tmp_path):
    ds = build_datastore(docs, tiny, tmp_path / "ivf", DatastoreConfig(
        window=64, stride=32, docs_per_chunk=4, factory="IVF16,Flat", nprobe=1), progress=False)
    n = len(ds)
    assert ds.probes_for(4) == 1 and ds.probes_for(n) == 16
    xq = np.asarray(ds.keys[:3], np.float32)
    k = n // 2  # far more than one list holds: nprobe 1 alone would return ~n/16 neighbours
    res = ds.search(xq, k)
    assert (res.I >= 0).all() and len(set(res.I[0].tolist())) == k


def test_rebuild_keeps_the_opt_outs(store, tiny, docs, small_config, caplog):
    planted = [d.id for d in store.docs].index("planted")
    store.optout(doc_ids=["planted"], sources=["p1"])
    with caplog.at_level("WARNING", logger="lmlab.silo"):
        again = build_datastore(docs, tiny, store.folder, small_config, progress=False)
    assert "kept the opt-outs" in caplog.text
    assert again.manifest["tombstones"] == store.manifest["tombstones"]
    assert again.removed_docs[planted] and again.removed_docs.sum() == 1 + 3 and len(again) == len(store)
    xq = np.asarray(again.keys[np.flatnonzero(again.doc == planted)], np.float32)
    assert not np.isin(again.search(xq, 50).I, np.flatnonzero(again.removed_docs[again.doc])).any()
    fresh = Datastore.load(store.folder)  # the index on disk was built without them, not only masked
    assert fresh.index.ntotal == len(again) and fresh.manifest["removed_entries"] == again.n_entries - len(again)


def test_two_processes_opting_out_keep_both(store):
    other = Datastore.load(store.folder)  # e.g. a server that loaded the datastore before the CLI's opt-out
    store.optout(doc_ids=["planted"])
    rep = other.optout(doc_ids=["doc00"])
    assert rep.tombstones["doc_ids"] == ["doc00", "planted"] and rep.documents == 1
    ids = [d.id for d in other.docs]
    assert other.removed_docs[ids.index("planted")]  # the other's opt-out applies here too
    again = Datastore.load(store.folder)
    assert again.manifest["tombstones"]["doc_ids"] == ["doc00", "planted"] and again.removed_docs.sum() == 2
    assert store.refresh() and store.removed_docs.sum() == 2 and len(store) == len(again)
    assert not store.refresh()  # unchanged since: one stat, nothing read


def test_optout_waits_for_the_folder_lock(store):
    import threading

    from lmlab.silo.datastore import folder_lock

    done = threading.Event()
    worker = threading.Thread(target=lambda: (Datastore.load(store.folder).optout(doc_ids=["doc01"]), done.set()))
    with folder_lock(store.folder):
        worker.start()
        assert not done.wait(1.0)  # blocked while another process holds the lock
    worker.join(30)
    assert done.is_set() and Datastore.load(store.folder).manifest["tombstones"]["doc_ids"] == ["doc01"]


def test_resume_with_other_documents_encodes_them_again(tiny, docs, small_config, tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(Interrupt):
        build_datastore(_interrupting(docs, 9), tiny, out, small_config, progress=False)  # chunks 0 and 1 done
    copyleft = [d for d in docs if d.license_class == "copyleft"]  # a rerun with another selection
    ds = build_datastore(copyleft, tiny, out, small_config, progress=False)
    ref = build_datastore(copyleft, tiny, tmp_path / "ref", small_config, progress=False)
    assert [d.id for d in ds.docs] == [d.id for d in copyleft]
    np.testing.assert_array_equal(ds.values, ref.values)
    np.testing.assert_array_equal(np.asarray(ds.keys), np.asarray(ref.keys))
    assert ds.manifest["corpus_fingerprint"] == ref.manifest["corpus_fingerprint"]


def test_shards_of_other_documents_are_refused(tiny, docs, doc_cls, small_config, tmp_path):
    edited = [*docs[:-1], doc_cls("planted", "Another text entirely, of the same document id.", "planted:secret",
                                  "LicenseRef-Proprietary", "unknown")]
    build_datastore(docs, tiny, tmp_path / "s0", small_config, shard=(0, 2), progress=False)
    build_datastore(edited, tiny, tmp_path / "s1", small_config, shard=(1, 2), progress=False)
    with pytest.raises(ManifestMismatchError, match="corpus_fingerprint"):
        merge_shards([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged", small_config, progress=False)


def test_out_that_is_not_a_datastore_is_refused(tiny, docs, small_config, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="not a silo-datastore"):
        build_datastore(docs[:2], tiny, victim, small_config, progress=False)
    assert (victim / "notes.txt").read_text() == "precious" and not (tmp_path / "victim.parts").exists()
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert build_datastore(docs[:2], tiny, tmp_path / "empty", small_config, progress=False).n_entries > 0


def test_index_types_that_train_or_cannot_remove(tiny, docs, small_config, tmp_path):
    from dataclasses import replace

    for factory in ("PQ8x4fs", "SQ8"):  # trained, but no inverted lists
        ds = build_datastore(docs, tiny, tmp_path / factory, replace(small_config, factory=factory), progress=False)
        assert ds.manifest["factory"] == factory and ds.optout(doc_ids=["planted"]).entries > 0
    for factory, words in (("NotAFactory", "cannot build"), ("PQ7", "cannot build"), ("HNSW16", "cannot remove")):
        with pytest.raises(ConfigError, match=words):
            build_datastore(docs, tiny, tmp_path / "bad", replace(small_config, factory=factory), progress=False)
        assert not (tmp_path / "bad.parts").exists()  # refused before encoding anything


def test_old_hnsw_datastore_refuses_optout_cleanly(store):
    import faiss

    from lmlab.silo.datastore import INDEX

    index = faiss.IndexIDMap2(faiss.index_factory(store.dim, "HNSW16"))
    index.add_with_ids(np.asarray(store.keys, np.float32), np.arange(store.n_entries, dtype=np.int64))
    faiss.write_index(index, str(store.folder / INDEX))
    with pytest.raises(ConfigError, match="cannot remove entries"):
        Datastore.load(store.folder).optout(doc_ids=["planted"])


@pytest.mark.parametrize("name", ["index.faiss", "values.npy", "docs.jsonl", "keys.f16"])
def test_missing_or_garbage_files_are_a_data_error(store, name):
    path = store.folder / name
    data = path.read_bytes()
    path.write_bytes(b"\x00" * len(data))  # same size: only reading it can tell
    with pytest.raises(DataError, match="incomplete or corrupted"):
        Datastore.load(store.folder)
    path.unlink()
    with pytest.raises(DataError, match=f"incomplete or corrupted \\({name} is missing"):
        Datastore.load(store.folder)


def test_dot_paths(store, tiny, docs, small_config, tmp_path, monkeypatch):
    from lmlab.silo.server import SiloService

    monkeypatch.chdir(store.folder)
    ds = Datastore.load(".")
    assert ds.folder == store.folder and ds.folder.is_absolute() and len(ds) == len(store)
    assert SiloService(tiny, ds).audit_log == store.folder.with_name("ds.audit.jsonl")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    build_datastore(docs[:2], tiny, ".", small_config, progress=False)
    assert Datastore.load(here).n_entries > 0 and not (tmp_path / "here.parts").exists()


def test_an_interrupted_refresh_of_a_rebuilt_folder_is_redone_whole(store, tiny, docs, small_config, monkeypatch):
    import faiss

    rebuilt = build_datastore(docs[:6], tiny, store.folder, small_config, progress=False)  # e.g. by another process

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(faiss, "read_index", interrupted)  # after values.npy and docs.jsonl were read
        with pytest.raises(KeyboardInterrupt):
            store.refresh()
    assert store.refresh()  # tried again: the whole folder, not only its tombstones
    assert len(store) == len(rebuilt) == store.n_entries and len(store.docs) == 6
    xq = np.asarray(rebuilt.keys[:5], np.float32)
    np.testing.assert_array_equal(store.search(xq, 4).I, rebuilt.search(xq, 4).I)


def test_a_failed_optout_leaves_the_object_as_the_folder_is(store, tiny, monkeypatch, disk_full):
    import lmlab.silo.datastore as datastore

    planted = [d.id for d in store.docs].index("planted")
    xq = np.asarray(store.keys[np.flatnonzero(store.doc == planted)], np.float32)
    live = len(store)

    with monkeypatch.context() as m:
        m.setattr(datastore, "write_json_atomic", disk_full)
        with pytest.raises(OSError):
            store.optout(doc_ids=["planted"])
    # nothing was persisted, and the object says so: no tombstone it does not have on disk, no temp file left
    assert store.manifest["tombstones"]["doc_ids"] == [] and not store.removed_docs.any() and len(store) == live
    assert sorted(p.name for p in store.folder.iterdir() if p.name.startswith(".")) == [".optout.lock"]
    rep = store.optout(doc_ids=["planted"])  # the retry removes it, and says so
    assert rep.documents == 1 and rep.entries == live - len(store) > 0
    again = Datastore.load(store.folder, tiny, verify=True)
    assert not np.isin(again.search(xq, 50).I, np.flatnonzero(again.doc == planted)).any()


def test_parts_of_another_model_are_not_reused(tiny, docs, small_config, tmp_path, monkeypatch):
    from lmlab.lm import models

    parts, rmtree = tmp_path / "ds.parts", shutil.rmtree

    def interrupted_cleanup(path, *args, **kwargs):  # the parts' clean-up stops after deleting build.json
        if path != parts:
            return rmtree(path, *args, **kwargs)
        (parts / "build.json").unlink()
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", interrupted_cleanup)
        with pytest.raises(KeyboardInterrupt):
            build_datastore(docs, tiny, tmp_path / "ds", small_config, progress=False)
    assert any(parts.glob("part-*.npz")) and not (parts / "build.json").exists()
    other = models.load("tiny:micro", seed=1)  # the next rebuild uses another model
    ds = build_datastore(docs, other, tmp_path / "ds", small_config, progress=False)
    ref = build_datastore(docs, other, tmp_path / "ref", small_config, progress=False)
    np.testing.assert_array_equal(np.asarray(ds.keys), np.asarray(ref.keys))  # its keys, not the parts' of tiny


def test_an_interrupted_refresh_of_new_tombstones_is_redone(store, monkeypatch):
    import lmlab.silo.datastore as datastore

    Datastore.load(store.folder).optout(doc_ids=["planted"])  # another process opts a document out
    planted = [d.id for d in store.docs].index("planted")
    xq = np.asarray(store.keys[np.flatnonzero(store.doc == planted)], np.float32)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(datastore, "match_documents", interrupted)
        with pytest.raises(KeyboardInterrupt):
            store.refresh()
    assert store.refresh() and store.removed_docs[planted]
    assert not np.isin(store.search(xq, 50).I, np.flatnonzero(store.doc == planted)).any()


def test_a_part_interrupted_while_written_leaves_no_temp_file(tiny, docs, small_config, tmp_path, monkeypatch):
    from pathlib import Path

    def interrupted(path, **arrays):  # half the file is on disk when the interrupt lands
        Path(path).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(np, "savez", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build_datastore(docs, tiny, tmp_path / "s0", small_config, shard=(0, 2), progress=False)
    assert [p.name for p in (tmp_path / "s0").iterdir()] == ["build.json"]
