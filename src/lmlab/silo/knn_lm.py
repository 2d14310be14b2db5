"""kNN-LM over a SILO datastore: interpolate the parametric LM with a nearest-neighbour distribution.

Papers: Khandelwal, Levy, Jurafsky, Zettlemoyer, Lewis, "Generalization through Memorization: Nearest Neighbor
Language Models" (arXiv 1911.00172), eq. (2)-(3); SILO (Min, Gururangan et al., arXiv 2308.04430), Sec. 3.2,
which uses kNN-LM over a restricted-licence datastore with a permissively trained LM.
Official code: urvashik/knnlm; kernelmachine/silo-lm (``scripts/main.py``: the grid, ``scripts/index.py``).

What is implemented (works with any Hugging Face causal LM, through ``lmlab.lm.score.iter_window_logprobs``):

- p_kNN(y | x) = sum_{(k_i, v_i) in N(x)} 1[y = v_i] softmax_i(-d(q, k_i) / temperature)   (Khandelwal eq. 2)
- p(y | x) = lmbda p_kNN(y | x) + (1 - lmbda) p_LM(y | x)                                   (Khandelwal eq. 3)
  computed in log space with ``logaddexp``; ``lmbda = 0`` returns log p_LM unchanged (bit-exact perplexity).
- Query q = the key point's hidden state (``hidden_states[-1]`` by default, as silo-lm), d = L2 distance
  (silo-lm's exact ``get_knn_scores``: ``-sqrt(sum((q - k)^2))``); ``distance="sq_l2"`` uses squared L2
  (urvashik/knnlm). With an approximate index, ``rescore`` recomputes exact distances from the fp16 keys.
- :meth:`KnnLM.tune`: one search at the largest k, then every (k, temperature, lmbda) of the grid scored
  from it in a vectorised pass: k in {16..4096} (silo-lm: 128..4096; smaller k added for small stores),
  temperature = silo-lm's exact-score grid plus its approximate-score grid, lmbda in silo-lm's
  {0, .1, .2, .3, .5, .7}. Tune on a validation split, then :meth:`KnnLM.evaluate` on test.
- :meth:`KnnLM.generate` and :meth:`KnnLM.attribute`: per-token attribution (``lmlab.silo.attribution``).

Deviations: neighbours are re-sorted by exact distance after ``rescore`` (silo-lm keeps the approximate order);
a query with no live neighbour (empty store) falls back to p_LM.

Shape legend: n scored positions, K neighbours, V vocab, D key width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from lmlab.errors import ConfigError, DataError
from lmlab.lm.backends import GREEDY_BELOW  # a sampling temperature below it decodes greedily (lp / T overflows)

K_GRID = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # silo-lm ks = [128, ..., 4096]; 16-64 added
TEMPERATURE_GRID = (0.5, 0.8, 0.9, 1.0, 2.0, 3.0, 4.0, 5.0,  # silo-lm, exact scores
                    10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0)  # silo-lm, approximate scores
LMBDA_GRID = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7)  # silo-lm lambdas


@dataclass(frozen=True)
class KnnLMConfig:
    k: int = 1024  # neighbours (silo-lm evaluates k up to 4096; tune on validation)
    temperature: float = 1.0  # softmax temperature over -distance (tune on validation)
    lmbda: float = 0.25  # interpolation weight of p_kNN (Khandelwal et al.'s Wikitext-103 value; tune)
    distance: str = "l2"  # "l2" (silo-lm exact scores) or "sq_l2" (urvashik/knnlm)
    rescore: bool = False  # exact distances from fp16 keys (for IVF-PQ indexes)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be at least 1; got {self.k}")
        if not 0 < self.temperature < math.inf:  # NaN fails too
            raise ConfigError(f"temperature must be a positive finite number; got {self.temperature}")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"lmbda must be in [0, 1]; got {self.lmbda}")
        if self.distance not in ("l2", "sq_l2"):
            raise ConfigError(f"distance must be 'l2' or 'sq_l2'; got {self.distance!r}")


@dataclass
class KnnLMResult:
    ppl: float  # kNN-LM perplexity
    ppl_lm: float  # the parametric model's perplexity on the same tokens
    nll: float
    nll_lm: float
    n_tokens: int
    token_nll: torch.Tensor  # (N-1,) aligned with positions 1..N-1
    token_nll_lm: torch.Tensor
    config: KnnLMConfig


@dataclass
class TuneResult:
    best: KnnLMConfig
    best_ppl: float
    ppl_lm: float
    n_tokens: int
    table: list[dict] = field(default_factory=list)  # {k, temperature, lmbda, ppl} for every grid point


@dataclass
class Generation:
    prompt: str
    text: str  # the generated continuation
    token_ids: list[int]
    tokens: list  # list[TokenAttribution]


# -- the maths (vectorised; used by evaluation, tuning and generation) --------------------------------


def neighbour_distances(D: torch.Tensor, distance: str = "l2") -> torch.Tensor:  # noqa: N803
    """The d of eq. 2 from faiss's squared L2 ``D``: its square root for ``"l2"`` (silo-lm), else ``D`` itself."""
    d = D.clamp_min(0)
    return d.sqrt() if distance == "l2" else d


def neighbour_logweights(D: torch.Tensor, temperature: float, distance: str = "l2") -> torch.Tensor:  # noqa: N803
    """log softmax(-d / T) over the K neighbours (Khandelwal eq. 2's weights); D (n, K) squared L2, inf = none."""
    scores = -neighbour_distances(D, distance) / temperature  # -inf where there is no neighbour
    none = torch.isinf(scores).all(-1, keepdim=True)
    return torch.log_softmax(torch.where(none, torch.zeros_like(scores), scores), -1).masked_fill(
        torch.isinf(scores), float("-inf"))


def knn_target_logprob(logw: torch.Tensor, values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p_kNN(target) (n,): log of the summed weights of neighbours whose value is the target (eq. 2).

    Summed as probabilities relative to each row's largest weight (no overflow): ~10x faster than
    ``logsumexp`` over a ``-inf``-masked copy, which dominated evaluation time at k = 1024.
    """
    hit = values == targets[:, None]
    m = logw.max(-1, keepdim=True).values
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return torch.log((torch.exp(logw - m) * hit).sum(-1)) + m.squeeze(-1)


def knn_target_logprob_from_distances(D: torch.Tensor, values: torch.Tensor, targets: torch.Tensor,  # noqa: N803
                                      temperature: float, distance: str = "l2") -> torch.Tensor:
    """log p_kNN(target) (n,) straight from squared distances: :func:`neighbour_logweights` then
    :func:`knn_target_logprob` in four passes over (n, K) instead of a dozen (evaluation's hot loop at
    k = 1024). NaN for a row with no neighbour (the caller substitutes p_LM)."""
    s = -neighbour_distances(D, distance) / temperature
    m = s.max(-1, keepdim=True).values  # -inf for a row with no neighbour -> 0/0 = NaN below
    w = torch.exp(s - m)
    return torch.log((w * (values == targets[:, None])).sum(-1) / w.sum(-1))


def knn_logprobs(logw: torch.Tensor, values: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p_kNN over the vocabulary (n, V): the neighbours' weights scattered into their value tokens (eq. 2)."""
    p = torch.zeros(logw.shape[0], vocab_size, dtype=torch.float64, device=logw.device)
    p.scatter_add_(1, values.clamp_min(0).long(), logw.exp().double().masked_fill(values < 0, 0.0))
    return p.log().float()


def interpolate(lp_lm: torch.Tensor, lp_knn: torch.Tensor, lmbda: float) -> torch.Tensor:
    """log(lmbda p_kNN + (1 - lmbda) p_LM) in log space (Khandelwal eq. 3); lmbda = 0 returns lp_lm itself."""
    if lmbda == 0.0:
        return lp_lm
    if lmbda == 1.0:
        return lp_knn
    return torch.logaddexp(lp_lm + math.log1p(-lmbda), lp_knn + math.log(lmbda))


# -- the model ----------------------------------------------------------------------------------------


class KnnLM:
    """A causal LM plus a :class:`~lmlab.silo.datastore.Datastore` built with that same model."""

    def __init__(self, loaded, datastore, config: KnnLMConfig = KnnLMConfig()):
        from lmlab.silo.datastore import check_compatible

        check_compatible(datastore.manifest, loaded, where=str(datastore.folder))
        self.loaded, self.datastore, self.config = loaded, datastore, config
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        m = datastore.manifest
        self.window = int(m.get("window", 1024))
        self.stride = int(m.get("stride", 512))

    def with_config(self, **changes) -> KnnLM:
        out = KnnLM.__new__(KnnLM)
        out.__dict__.update(self.__dict__)
        out.config = replace(self.config, **changes)  # replace() validates it again (__post_init__)
        return out

    # search helpers
    def _neighbours(self, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, values) for queries (n, D): squared L2 distances (n, K) and the neighbours' value tokens (n, K).

        K is ``k`` clamped to the live entries: a larger k finds no more neighbours, only padding to search past."""
        k = max(1, min(k, len(self.datastore)))
        xq = keys.float().cpu().numpy()
        res = self.datastore.search(xq, k, rescore=self.config.rescore)
        D, I = res.D, res.I  # noqa: E741
        if self.config.rescore:
            order = np.argsort(D, axis=1, kind="stable")
            D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)  # noqa: E741
        vals = np.where(I >= 0, self.datastore.values[np.maximum(I, 0)], -1)
        return torch.from_numpy(D), torch.from_numpy(vals.astype(np.int64)), I

    def _windows(self, ids, window, stride, batch_size, progress):
        from lmlab.silo.datastore import iter_scored_keys

        return iter_scored_keys(self.model, ids, key_point=self.datastore.key_point,
                                window=window or self.window, stride=stride or self.stride,
                                batch_size=batch_size, progress=progress)

    def encode(self, texts: list[str]) -> list[int]:
        """Texts joined with EOS, as the datastore joined its documents."""
        if not texts:
            raise DataError("no text to evaluate")
        ids: list[int] = []
        for i, t in enumerate(texts):
            if i:
                ids.append(self.tokenizer.eos_token_id)
            ids.extend(self.tokenizer(t, add_special_tokens=False)["input_ids"])
        return ids

    # evaluation
    def evaluate(self, ids, *, window: int | None = None, stride: int | None = None, batch_size: int = 8,
                 progress: bool = False) -> KnnLMResult:
        """kNN-LM and parametric perplexity of one token sequence (windows as ``lmlab.lm.score.perplexity``)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        n = len(ids) - 1
        if n < 1:
            raise DataError("need at least 2 tokens to evaluate")
        c = self.config
        token_nll = torch.empty(n, dtype=torch.float32)
        token_nll_lm = torch.empty(n, dtype=torch.float32)
        for sk in self._windows(ids, window, stride, batch_size, progress):
            w = sk.window
            lp_lm = sk.logprobs.gather(-1, sk.target_ids[:, None]).squeeze(-1).cpu()  # (n,)
            if c.lmbda == 0.0:
                lp = lp_lm
            else:
                D, vals, _ = self._neighbours(sk.keys, c.k)
                lp_knn = knn_target_logprob_from_distances(D, vals, sk.target_ids.cpu(), c.temperature, c.distance)
                lp_knn = torch.where(torch.isnan(lp_knn), lp_lm, lp_knn)  # no neighbour: p_kNN := p_LM
                lp = interpolate(lp_lm, lp_knn, c.lmbda)
            token_nll[w.score_from - 1:w.end - 1] = -lp
            token_nll_lm[w.score_from - 1:w.end - 1] = -lp_lm
        nll, nll_lm = token_nll.double().sum().item(), token_nll_lm.double().sum().item()
        return KnnLMResult(ppl=math.exp(nll / n), ppl_lm=math.exp(nll_lm / n), nll=nll, nll_lm=nll_lm, n_tokens=n,
                           token_nll=token_nll, token_nll_lm=token_nll_lm, config=c)

    def evaluate_texts(self, texts: list[str], **kw) -> KnnLMResult:
        return self.evaluate(self.encode(texts), **kw)

    def tune(self, ids, *, k_grid=K_GRID, temperature_grid=TEMPERATURE_GRID, lmbda_grid=LMBDA_GRID,
             window: int | None = None, stride: int | None = None, batch_size: int = 8,
             progress: bool = False) -> TuneResult:
        """Grid-search (k, temperature, lmbda) on ``ids`` (a validation split); one search at the largest k.

        k values above the number of live entries are dropped (they would equal the largest k that fits). A
        datastore with no live entry (every document opted out) has nothing to tune: DataError.
        """
        if not k_grid or any(int(k) < 1 for k in k_grid):
            raise ConfigError(f"k_grid must hold neighbour counts >= 1, got {tuple(k_grid)}")
        ids = torch.as_tensor(ids, dtype=torch.long)
        live = len(self.datastore)
        if live == 0:
            raise DataError(f"the datastore {self.datastore.folder} has no live entries (every document is opted "
                            "out): there is no k, temperature or lmbda to tune; rebuild it with other documents")
        ks = sorted({min(k, live) for k in k_grid})
        k_max = ks[-1]
        temps = list(temperature_grid)
        lmbdas = torch.tensor(list(lmbda_grid), dtype=torch.float64)
        nll = torch.zeros(len(ks), len(temps), len(lmbdas), dtype=torch.float64)
        nll_lm = 0.0
        n = 0
        log1m = torch.log1p(-lmbdas.clamp(max=1 - 1e-12))
        logl = torch.log(lmbdas)  # -inf at 0: logaddexp gives lp_lm exactly
        kk = torch.tensor(ks) - 1
        tt = torch.tensor(temps, dtype=torch.float64)[:, None, None]
        for sk in self._windows(ids, window, stride, batch_size, progress):
            lp_lm = sk.logprobs.gather(-1, sk.target_ids[:, None]).squeeze(-1).cpu().double()
            D, vals, _ = self._neighbours(sk.keys, k_max)  # sorted by distance: the k nearest are a prefix
            hit = (vals == sk.target_ids.cpu()[:, None]).double()
            empty = torch.isinf(D).all(-1)
            d = neighbour_distances(D.double(), self.config.distance)
            d = torch.where(empty[:, None], torch.zeros_like(d), d)
            d = d - d[:, :1]  # relative to the nearest: exp(-d / t) <= 1, no overflow; inf -> weight 0
            # eq. 2 for every (k, temperature) at once: p_kNN(target | k nearest) = (sum of the first k weights
            # on the target) / (sum of the first k weights), as prefix sums over the sorted neighbours
            w = torch.exp(-d[None] / tt)  # (T, n, K)
            total = w.cumsum(-1)[..., kk]  # (T, n, len(ks))
            on_target = (w * hit).cumsum(-1)[..., kk]
            lp_knn = torch.where(empty[None, :, None], lp_lm[None, :, None], on_target.log() - total.log())
            lp = torch.logaddexp(lp_lm[None, :, None, None] + log1m, lp_knn[..., None] + logl)  # (T, n, K, L) eq. 3
            nll -= lp.sum(1).transpose(0, 1)
            nll_lm -= lp_lm.sum().item()
            n += len(lp_lm)
        ppl = torch.exp(nll / n)
        table = [dict(k=k, temperature=t, lmbda=float(lm), ppl=float(ppl[a, b, c]))
                 for a, k in enumerate(ks) for b, t in enumerate(temps) for c, lm in enumerate(lmbdas.tolist())]
        a, b, c = np.unravel_index(int(torch.argmin(ppl)), tuple(ppl.shape))
        best = replace(self.config, k=ks[a], temperature=temps[b], lmbda=float(lmbdas[c]))
        return TuneResult(best=best, best_ppl=float(ppl[a, b, c]), ppl_lm=math.exp(nll_lm / n), n_tokens=n,
                          table=table)

    # attribution
    def attribute(self, text: str, *, top: int = 3, window: int | None = None) -> list:
        """Per-token attribution of ``text`` (every token from the second): log-probs and top neighbours."""
        from lmlab.silo.attribution import TokenAttribution, top_neighbours

        ids = torch.as_tensor(self.encode([text]), dtype=torch.long)
        if len(ids) < 2:
            raise DataError("the text must have at least 2 tokens to attribute")
        c = self.config
        out = []
        for sk in self._windows(ids, window, None, 8, False):
            D, vals, I = self._neighbours(sk.keys, c.k)  # noqa: E741
            logw = neighbour_logweights(D, c.temperature, c.distance)
            tg = sk.target_ids.cpu()
            lp_lm = sk.logprobs.gather(-1, tg[:, None]).squeeze(-1).cpu()
            lp_knn = knn_target_logprob(logw, vals, tg)
            lp = interpolate(lp_lm, torch.where(torch.isinf(D).all(-1), lp_lm, lp_knn), c.lmbda)
            for j in range(len(tg)):
                y = int(tg[j])
                out.append(TokenAttribution(
                    position=sk.window.score_from + j, token_id=y, token=self.tokenizer.decode([y]),
                    logprob=float(lp[j]), logprob_lm=float(lp_lm[j]), logprob_knn=float(lp_knn[j]),
                    datastore_share=_share(c.lmbda, float(lp_knn[j]), float(lp[j])),
                    neighbours=top_neighbours(self.datastore, self.tokenizer, I[j], D[j].numpy(), logw[j].numpy(),
                                              y, top=top)))
        return out

    @torch.no_grad()
    def generate(self, prompt: str, *, max_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                 top: int = 3, stop_at_eos: bool = True) -> Generation:
        """Decode from the kNN-LM distribution, attributing every generated token.

        ``temperature`` 0 is greedy, and so is any temperature below ``GREEDY_BELOW`` (1e-5): sampling tends to
        greedy as T -> 0, and ``lp / T`` would overflow to -inf everywhere (NaN probabilities). Above it, samples
        from softmax(lp / T) (finite: lp's largest entry is >= -log V). ``seed`` in [0, 2**63 - 1].
        """
        from lmlab.lm.hooks import capture
        from lmlab.silo.attribution import TokenAttribution, top_neighbours
        from lmlab.silo.datastore import parse_key_point

        if max_tokens < 1:
            raise ConfigError("max_tokens must be at least 1")
        if not temperature >= 0 or math.isinf(temperature):
            raise ConfigError(f"temperature must be a finite number >= 0; got {temperature}")
        if not 0 <= seed <= 2**63 - 1:
            raise ConfigError(f"seed must be in [0, 2**63 - 1]; got {seed}")
        tok, model, c = self.tokenizer, self.model, self.config
        ids = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        if not ids:
            ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and len(ids) + max_tokens > max_pos:
            raise ConfigError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                              f"{max_pos} positions: shorten them")
        module, where = parse_key_point(self.datastore.key_point)
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(seed)
        V = model.config.vocab_size  # noqa: N806
        x = torch.tensor([ids], device=device)
        import inspect

        cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        past = None
        out_ids: list[int] = []
        attributions = []
        for step in range(max_tokens):
            if module == "final":
                out = model(x, **{cache_kw: past}, use_cache=True, output_hidden_states=True)
                q = out.hidden_states[-1][0, -1:]
            else:
                with capture(model, module, what=where) as cap:
                    out = model(x, **{cache_kw: past}, use_cache=True)
                q = cap[module][0, -1:]
            past = getattr(out, cache_kw)
            lp_lm = torch.log_softmax(out.logits[0, -1:].float(), -1).cpu()  # (1, V)
            D, vals, I = self._neighbours(q, c.k)  # noqa: E741
            logw = neighbour_logweights(D, c.temperature, c.distance)
            lp_knn = knn_logprobs(logw, vals, V) if not torch.isinf(D).all() else lp_lm
            lp = interpolate(lp_lm, lp_knn, c.lmbda)[0]
            if temperature < GREEDY_BELOW:
                y = int(torch.argmax(lp))
            else:
                y = int(torch.multinomial(torch.softmax(lp / temperature, -1), 1, generator=gen))
            out_ids.append(y)
            attributions.append(TokenAttribution(
                position=len(ids) + step, token_id=y, token=tok.decode([y]), logprob=float(lp[y]),
                logprob_lm=float(lp_lm[0, y]), logprob_knn=float(lp_knn[0, y]),
                datastore_share=_share(c.lmbda, float(lp_knn[0, y]), float(lp[y])),
                neighbours=top_neighbours(self.datastore, tok, I[0], D[0].numpy(), logw[0].numpy(), y, top=top)))
            if stop_at_eos and y == tok.eos_token_id:
                break
            x = torch.tensor([[y]], device=device)
        return Generation(prompt=prompt, text=tok.decode(out_ids, skip_special_tokens=True), token_ids=out_ids,
                          tokens=attributions)


def _share(lmbda: float, lp_knn: float, lp: float) -> float:
    if lmbda == 0.0 or math.isinf(lp_knn):
        return 0.0
    return float(min(1.0, math.exp(math.log(lmbda) + lp_knn - lp)))
