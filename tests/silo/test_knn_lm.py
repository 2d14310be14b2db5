"""kNN-LM: lambda = 0 is the base model exactly, eq. 2/3 invariants, tuning, attribution, opt-out effect."""

import math

import numpy as np
import pytest
import torch

from lmlab.errors import ConfigError, DataError, ManifestMismatchError
from lmlab.lm.score import perplexity
from lmlab.silo import Datastore, KnnLM, KnnLMConfig, interpolate
from lmlab.silo.knn_lm import knn_logprobs, knn_target_logprob, neighbour_logweights

torch.set_num_threads(1)


def test_lambda_zero_reproduces_base_perplexity_exactly(store, tiny, docs):
    knn = KnnLM(tiny, store, KnnLMConfig(k=8, lmbda=0.0))
    ids = knn.encode([docs[1].text, docs[2].text])
    base = perplexity(tiny.model, ids, window=64, stride=32)
    r = knn.evaluate(ids, window=64, stride=32)
    assert r.ppl == base.ppl and r.nll == base.nll and r.ppl_lm == base.ppl
    assert torch.equal(r.token_nll, base.token_nll)


def test_distribution_invariants():
    g = torch.Generator().manual_seed(0)
    D = torch.rand(5, 7, generator=g) * 4
    D[0, 3:] = float("inf")  # fewer than K neighbours
    vals = torch.randint(0, 11, (5, 7), generator=g)
    vals[0, 3:] = -1
    logw = neighbour_logweights(D, 2.0)
    torch.testing.assert_close(logw.exp().sum(-1), torch.ones(5))
    full = knn_logprobs(logw, vals, 11)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(5))
    tg = torch.randint(0, 11, (5,), generator=g)
    torch.testing.assert_close(knn_target_logprob(logw, vals, tg), full.gather(1, tg[:, None]).squeeze(1))
    from lmlab.silo.knn_lm import knn_target_logprob_from_distances  # the evaluation's fused form: same numbers

    torch.testing.assert_close(knn_target_logprob_from_distances(D, vals, tg, 2.0), knn_target_logprob(logw, vals, tg))
    assert torch.isnan(knn_target_logprob_from_distances(torch.full((1, 3), float("inf")), vals[:1, :3], tg[:1], 1.0))
    lp_lm = torch.log_softmax(torch.randn(5, 11, generator=g), -1)
    mix = interpolate(lp_lm, full, 0.3)
    torch.testing.assert_close(mix.exp(), 0.7 * lp_lm.exp() + 0.3 * full.exp())
    assert interpolate(lp_lm, full, 0.0) is lp_lm
    torch.testing.assert_close(interpolate(lp_lm, full, 1.0), full)
    # closer neighbours weigh more; a lower temperature sharpens
    d = torch.tensor([[0.1, 1.0, 4.0]])
    w1, w2 = neighbour_logweights(d, 1.0).exp(), neighbour_logweights(d, 0.5).exp()
    assert w1[0, 0] > w1[0, 1] > w1[0, 2] and w2[0, 0] > w1[0, 0]


def test_planted_document_is_memorised_then_forgotten_after_optout(store, tiny, planted_text):
    knn = KnnLM(tiny, store, KnnLMConfig(k=16, temperature=1.0, lmbda=0.5))
    ids = knn.encode([planted_text])
    before = knn.evaluate(ids, window=64, stride=32)
    assert before.ppl < 0.2 * before.ppl_lm  # the datastore holds this exact text
    store.optout(doc_ids=["planted"])
    after = KnnLM(tiny, Datastore.load(store.folder), knn.config).evaluate(ids, window=64, stride=32)
    assert after.ppl_lm == before.ppl_lm
    assert abs(math.log(after.ppl / after.ppl_lm)) < 0.5 * abs(math.log(before.ppl / before.ppl_lm))


def test_tune_grid_and_best(store, tiny, docs):
    knn = KnnLM(tiny, store, KnnLMConfig())
    ids = knn.encode([docs[3].text])
    tr = knn.tune(ids, k_grid=(4, 16, 10**6), temperature_grid=(0.5, 1.0, 5.0), lmbda_grid=(0.0, 0.3, 0.7),
                  window=64, stride=32)
    assert {r["k"] for r in tr.table} == {4, 16, len(store)}  # k capped at the live entries
    assert len(tr.table) == 3 * 3 * 3
    assert min(r["ppl"] for r in tr.table) == pytest.approx(tr.best_ppl)
    lam0 = [r["ppl"] for r in tr.table if r["lmbda"] == 0.0]
    assert np.allclose(lam0, tr.ppl_lm)  # lambda 0 rows are the parametric model's perplexity
    # the grid's value at the best point equals a direct evaluation with that config
    direct = knn.with_config(k=tr.best.k, temperature=tr.best.temperature, lmbda=tr.best.lmbda).evaluate(
        ids, window=64, stride=32)
    assert direct.ppl == pytest.approx(tr.best_ppl, rel=1e-4)
    assert tr.best_ppl < tr.ppl_lm
    for row in tr.table:  # and so does every other point (the grid sums prefixes of the sorted neighbours)
        if row["lmbda"] == 0.3 and row["k"] in (4, 16):
            got = knn.with_config(k=row["k"], temperature=row["temperature"], lmbda=0.3).evaluate(
                ids, window=64, stride=32)
            assert got.ppl == pytest.approx(row["ppl"], rel=1e-4)


def test_attribution_names_documents_and_excludes_opted_out(store, tiny, planted_text):
    knn = KnnLM(tiny, store, KnnLMConfig(k=16, lmbda=0.5))
    toks = knn.attribute(planted_text[:60], top=3)
    assert len(toks) == len(tiny.tokenizer(planted_text[:60], add_special_tokens=False)["input_ids"]) - 1
    top = [n for t in toks for n in t.neighbours[:1]]
    assert top and sum(n.doc_id == "planted" for n in top) > 0.8 * len(top)
    n = top[5]
    assert n.license == "LicenseRef-Proprietary" and n.source == "planted:secret" and n.snippet
    for t in toks:
        if t.neighbours:
            assert 0 < sum(x.share for x in t.neighbours) <= 1 + 1e-6
            assert all(store.values[x.entry] == t.token_id for x in t.neighbours)
    store.optout(doc_ids=["planted"])
    toks = knn.attribute(planted_text[:60], top=5)
    assert all(x.doc_id != "planted" for t in toks for x in t.neighbours)


def test_generate_lambda_zero_is_greedy_decoding_and_attributes(store, tiny, docs):
    prompt = docs[0].text[:20]
    g0 = KnnLM(tiny, store, KnnLMConfig(k=8, lmbda=0.0)).generate(prompt, max_tokens=8, stop_at_eos=False)
    ids = tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ref = tiny.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, len(ids):]
    assert g0.token_ids == ref.tolist()
    g = KnnLM(tiny, store, KnnLMConfig(k=16, lmbda=0.7)).generate(prompt, max_tokens=12, stop_at_eos=False)
    assert len(g.tokens) == 12 and g.text
    assert docs[0].text.startswith(prompt + g.text[:5])  # the datastore steers the random model to the source
    assert any(t.neighbours and t.neighbours[0].doc_id in {d.id for d in docs} for t in g.tokens)
    assert all(0 <= t.datastore_share <= 1 for t in g.tokens)


def test_wrong_model_and_bad_config_refused(store):
    from lmlab.lm import models

    with pytest.raises(ManifestMismatchError):
        KnnLM(models.load("tiny:micro", seed=3), store)
    with pytest.raises(ConfigError):
        KnnLMConfig(lmbda=1.5).validate()
    with pytest.raises(ConfigError):
        KnnLMConfig(distance="cosine").validate()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="temperature must be a positive finite number"):
            KnnLMConfig(temperature=bad)


def test_k_above_the_datastore_is_clamped_to_it(store, tiny):
    # k = 10**8 padded every search to 10**8 columns (45 s for a few generated tokens)
    knn = KnnLM(tiny, store, KnnLMConfig(k=len(store) + 100, lmbda=0.5))
    D, vals, I = knn._neighbours(torch.as_tensor(np.asarray(store.keys[:3], np.float32)), knn.config.k)  # noqa: E741
    assert D.shape == vals.shape == I.shape == (3, len(store)) and (I >= 0).all()


def test_tiny_sampling_temperature_is_greedy_and_seed_is_bounded(store, tiny, docs):
    knn = KnnLM(tiny, store, KnnLMConfig(k=16, lmbda=0.5))
    prompt = docs[3].text[:20]
    greedy = knn.generate(prompt, max_tokens=6, stop_at_eos=False)
    for t in (1e-40, 1e-6):  # lp / T would be -inf everywhere: softmax NaN, multinomial error
        assert knn.generate(prompt, max_tokens=6, temperature=t, seed=5, stop_at_eos=False).token_ids == \
            greedy.token_ids
    assert len(knn.generate(prompt, max_tokens=3, temperature=0.7, seed=2**63 - 1).token_ids) >= 1
    for bad in (dict(seed=2**64), dict(seed=-1), dict(temperature=float("nan")), dict(temperature=float("inf"))):
        with pytest.raises(ConfigError):
            knn.generate(prompt, max_tokens=2, **{"temperature": 1.0, **bad})


def test_store_with_everything_opted_out(store, tiny, docs):
    store.optout(license_classes=sorted({d.license_class for d in store.docs}))  # every document
    assert len(store) == 0
    knn = KnnLM(tiny, store, KnnLMConfig(k=8, lmbda=0.5))
    ids = knn.encode([docs[1].text])
    with pytest.raises(DataError, match="no live entries"):
        knn.tune(ids, window=64, stride=32)
    r = knn.evaluate(ids, window=64, stride=32)  # no neighbour: p_kNN := p_LM (module docstring)
    assert r.ppl == pytest.approx(r.ppl_lm, rel=1e-6)


@pytest.mark.parametrize("grid", [(0, 4), (), (-1,)])
def test_tune_refuses_a_k_grid_without_positive_counts(store, tiny, docs, grid):
    """k=0 used to become index -1 (scored as the largest k) and could be picked as the best k."""
    knn = KnnLM(tiny, store, KnnLMConfig(k=8, lmbda=0.5))
    with pytest.raises(ConfigError, match="k_grid"):
        knn.tune(knn.encode([docs[1].text]), k_grid=grid, window=64, stride=32)
