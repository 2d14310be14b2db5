"""Offloaded MoE inference with Pre-gated MoE's next-block expert prefetch (arXiv 2308.12066).

Public API:

- :func:`save_expert_store`, :class:`ExpertStore`: the experts of a
  :class:`lmlab.moe.pregated.PreGatedMoEForCausalLM` in one memory-mapped safetensors file (the slow tier).
- tiers: :class:`PageCacheTier` (``mmap``), :class:`DiskTier` (``disk``, page cache evicted before each read),
  :class:`LinkTier` (``link``, emulated GB/s + latency), :class:`CudaTier` (``cuda``, pinned CPU -> GPU on a side
  stream); :func:`make_tier` by name.
- :class:`OffloadEngine` + :class:`OffloadConfig` (policies ``resident``, ``on_demand``, ``prefetch_all``,
  ``pregated``, optional LRU slots) -> :class:`GenerationResult` with :class:`OffloadMetrics`.
"""

from lmlab.moe.offload.engine import (
    ENGINE_REVISION,
    POLICIES,
    THREAD_NAME,
    BudgetError,
    GenerationResult,
    OffloadConfig,
    OffloadEngine,
    OffloadMetrics,
    ResidentSet,
)
from lmlab.moe.offload.store import ExpertStore, save_expert_store
from lmlab.moe.offload.tiers import TIERS, CudaTier, DiskTier, LinkTier, PageCacheTier, make_tier

__all__ = [
    "ENGINE_REVISION", "POLICIES", "THREAD_NAME", "TIERS", "BudgetError", "CudaTier", "DiskTier", "ExpertStore",
    "GenerationResult", "LinkTier", "OffloadConfig", "OffloadEngine", "OffloadMetrics", "PageCacheTier", "ResidentSet",
    "make_tier", "save_expert_store",
]
