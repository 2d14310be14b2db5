"""SILO: a permissively trained LM plus a restricted-data datastore (Min, Gururangan et al. 2023, arXiv 2308.04430).

- :mod:`~lmlab.silo.datastore`: keys/values/provenance of a corpus, faiss index, shards, resume, opt-out
- :mod:`~lmlab.silo.knn_lm`: kNN-LM (Khandelwal et al. 2020) interpolation, tuning, generation with attribution
- :mod:`~lmlab.silo.ric_lm`: retrieval-in-context LM (BM25 blocks prepended to each window)
- :mod:`~lmlab.silo.attribution`: per-token neighbours / blocks with document id, source, licence
- :mod:`~lmlab.silo.server`: the FastAPI service (``lmlab silo serve``)

Names are imported lazily (PEP 562), so ``lmlab silo --help`` does not import torch or faiss.
"""

import importlib

_NAMES = {
    "attribution": ("Block", "Neighbour", "TokenAttribution"),
    "datastore": ("Datastore", "DatastoreConfig", "DocInfo", "OptOutReport", "build_datastore", "encode_parts",
                  "iter_scored_keys", "merge_shards", "model_fingerprint"),
    "knn_lm": ("Generation", "KnnLM", "KnnLMConfig", "KnnLMResult", "TuneResult", "interpolate"),
    "ric_lm": ("RicLM", "RicLMConfig", "RicLMResult"),
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"lmlab.silo.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'lmlab.silo' has no attribute {name!r}")


def __dir__():
    return __all__
