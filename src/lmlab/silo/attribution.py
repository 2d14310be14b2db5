"""Attribution: which datastore documents a kNN-LM (or RIC-LM) prediction came from.

SILO (Min et al. 2023, arXiv 2308.04430) argues that a nonparametric datastore supports *attribution*: every
token's p_kNN is a weighted vote of stored tokens, each with a known document. The paper does not define an
API; this module is ours. For a token y, neighbour i (with value v_i) contributes ``w_i = softmax(-d/T)_i`` to
p_kNN(v_i); its ``share`` of the token is ``w_i / p_kNN(y)`` over neighbours with ``v_i == y``.
Opted-out documents never appear: the datastore's search masks them before this module sees them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Neighbour:
    entry: int  # datastore entry id
    doc_id: str
    source: str
    license: str
    license_class: str
    offset: int  # token offset of the stored value in its document
    snippet: str  # the document's text around (and up to) the stored token
    distance: float  # L2 distance to the query key
    weight: float  # softmax(-d/T): this neighbour's mass in p_kNN (sums to 1 over the K neighbours)
    share: float  # fraction of p_kNN(token) that this neighbour gives (sums to 1 over neighbours voting the token)


@dataclass
class TokenAttribution:
    position: int  # index of the token in the scored / generated sequence
    token_id: int
    token: str
    logprob: float  # log p(y) of the interpolated kNN-LM
    logprob_lm: float  # log p_LM(y)
    logprob_knn: float  # log p_kNN(y) (-inf when no neighbour votes y)
    datastore_share: float  # lambda p_kNN(y) / p(y): how much of the probability came from the datastore
    neighbours: list[Neighbour] = field(default_factory=list)


@dataclass
class Block:
    """A RIC-LM retrieved block (its provenance)."""

    block: int
    doc_id: str
    source: str
    license: str
    license_class: str
    offset: int  # first token of the block in its document
    score: float  # BM25 score
    snippet: str


def top_neighbours(datastore, tokenizer, I_row: np.ndarray, dist_row: np.ndarray,  # noqa: N803
                   logw_row: np.ndarray, token: int, *, top: int = 3, snippet_tokens: int = 24) -> list[Neighbour]:
    """The ``top`` neighbours voting ``token`` (value == token), by weight, with provenance and a snippet."""
    ok = I_row >= 0
    if not ok.any():
        return []
    vals = np.full(I_row.shape, -1, np.int64)
    vals[ok] = datastore.values[I_row[ok]]
    voting = np.flatnonzero(ok & (vals == token))
    if len(voting) == 0:
        return []
    w = np.exp(logw_row.astype(np.float64))
    p_tok = float(w[voting].sum())
    order = voting[np.argsort(-w[voting], kind="stable")][:top]
    out = []
    for j in order:
        e = int(I_row[j])
        d = datastore.entry_doc(e)
        out.append(Neighbour(entry=e, doc_id=d.id, source=d.source, license=d.license,
                             license_class=d.license_class, offset=int(datastore.offset[e]),
                             snippet=datastore.snippet(e, tokenizer, before=snippet_tokens),
                             distance=float(np.sqrt(max(float(dist_row[j]), 0.0))), weight=float(w[j]),
                             share=float(w[j] / p_tok) if p_tok > 0 else 0.0))
    return out
