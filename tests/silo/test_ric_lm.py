"""RIC-LM: no blocks = the base model; retrieval finds the source; only the window's tokens are scored; opt-out."""

import pytest
import torch

from lmlab.errors import ConfigError, DataError, ManifestMismatchError
from lmlab.lm.score import perplexity
from lmlab.silo.ric_lm import RicLM, RicLMConfig

torch.set_num_threads(1)


@pytest.fixture()
def ric(docs, tiny, tmp_path):
    return RicLM.build(docs, tiny.tokenizer, tmp_path / "ric", block_tokens=32)


def test_zero_blocks_is_the_base_model(ric, tiny, planted_text):
    ids = tiny.tokenizer(planted_text, add_special_tokens=False)["input_ids"]
    r = ric.evaluate(tiny.model, tiny.tokenizer, ids, RicLMConfig(block_tokens=32, n_blocks=0, window=64, stride=32))
    base = perplexity(tiny.model, ids, window=64, stride=32)
    assert r.n_tokens == base.n_tokens == len(ids) - 1
    torch.testing.assert_close(r.token_nll, base.token_nll, rtol=1e-4, atol=1e-4)


def test_retrieval_prepends_the_source_block_and_scores_only_the_window(ric, tiny, planted_text):
    ids = tiny.tokenizer(planted_text, add_special_tokens=False)["input_ids"]
    cfg = RicLMConfig(block_tokens=32, n_blocks=2, window=64, stride=32)
    r = ric.evaluate(tiny.model, tiny.tokenizer, ids, cfg)
    assert r.n_tokens == len(ids) - 1 and r.retrieved[0] == []  # the first window has no context to query with
    later = [b for bl in r.retrieved[1:] for b in bl]
    assert later and all(ric.docs[ric.block_doc[b]].id == "planted" for b in later)
    blocks = ric.blocks_for([(later[0], 1.0)], tiny.tokenizer)
    assert blocks[0].license == "LicenseRef-Proprietary" and blocks[0].snippet
    assert ric.optout(doc_ids=["planted"]) > 0
    again = RicLM.load(ric.folder, tiny.tokenizer)
    r2 = again.evaluate(tiny.model, tiny.tokenizer, ids, cfg)
    assert all(again.docs[again.block_doc[b]].id != "planted" for bl in r2.retrieved for b in bl)


def test_budget_and_tokenizer_checked(ric, tiny):
    with pytest.raises(ConfigError, match="exceeds"):
        RicLMConfig(block_tokens=200, n_blocks=1, window=64, stride=32).validate(256)
    from lmlab.lm.tokenizer import train_bpe

    with pytest.raises(ManifestMismatchError):
        RicLM.load(ric.folder, train_bpe(["some text here"] * 10, vocab_size=280))


def test_rebuild_keeps_opt_outs_and_two_writers_keep_both(ric, docs, tiny):
    other = RicLM.load(ric.folder)  # loaded before the first opt-out, like a running server
    assert ric.optout(doc_ids=["planted"]) > 0
    assert other.optout(doc_ids=["doc00"]) > 0 and other.removed_docs.sum() == 2  # merged with the disk's
    again = RicLM.build(docs, tiny.tokenizer, ric.folder, block_tokens=32)
    assert again.manifest["tombstones"]["doc_ids"] == ["doc00", "planted"] and again.removed_docs.sum() == 2
    assert ric.refresh() and ric.removed_docs.sum() == 2


def test_build_refuses_a_foreign_folder_and_a_corpus_without_terms(docs, doc_cls, tiny, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="not a silo-ric-index"):
        RicLM.build(docs, tiny.tokenizer, victim, block_tokens=32)
    assert (victim / "notes.txt").read_text() == "precious"
    blank = [doc_cls("a", "", "s", "MIT", "permissive_sw"), doc_cls("b", "a", "s", "MIT", "permissive_sw")]
    with pytest.raises(DataError, match="BM25"):
        RicLM.build(blank, tiny.tokenizer, tmp_path / "blank", block_tokens=32)


def test_missing_block_file_is_a_data_error(ric):
    (ric.folder / "blocks.npz").unlink()
    with pytest.raises(DataError, match="incomplete or corrupted"):
        RicLM.load(ric.folder)


def test_an_interrupted_refresh_of_a_rebuilt_index_is_redone_whole(ric, docs, tiny, monkeypatch):
    import bm25s

    rebuilt = RicLM.build(docs[:3], tiny.tokenizer, ric.folder, block_tokens=32)  # e.g. by another process

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(bm25s.BM25, "load", interrupted)  # after blocks.npz and docs.jsonl were read
        with pytest.raises(KeyboardInterrupt):
            ric.refresh()
    assert ric.refresh() and ric.n_blocks == rebuilt.n_blocks and len(ric.docs) == 3
    assert ric.retrieve(["package p1 prints lines"], 5) == rebuilt.retrieve(["package p1 prints lines"], 5)


def test_a_failed_optout_leaves_the_index_as_its_folder_is(ric, monkeypatch, disk_full):
    import lmlab.silo.ric_lm as ric_lm

    with monkeypatch.context() as m:
        m.setattr(ric_lm, "write_json_atomic", disk_full)
        with pytest.raises(OSError):
            ric.optout(doc_ids=["planted"])
    assert ric.manifest["tombstones"]["doc_ids"] == [] and not ric.removed_docs.any()  # nothing was persisted
    assert ric.optout(doc_ids=["planted"]) > 0  # the retry masks the blocks, and says so
    assert RicLM.load(ric.folder).removed_docs.sum() == 1
