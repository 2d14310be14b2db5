"""An offloaded MoE inference engine with the Pre-gated MoE prefetch (arXiv 2308.12066).

Shapes: B batch, D width, H expert hidden width, E experts, k experts per token, L blocks, S resident slots,
A = min(E, B k) the most experts one block can need for one decode step.

The engine decodes a :class:`~lmlab.moe.pregated.PreGatedMoEForCausalLM` token by token (greedy; batch 1 is the
paper's setting, small batches of any prompt lengths also work). The non-expert weights stay in fast memory; the
experts live in an :class:`~lmlab.moe.offload.store.ExpertStore` (slow tier) and are copied into a **resident set** of
S fixed, preallocated slots (fast memory: RAM on the CPU, GPU memory with the cuda tier) by a tier
(:mod:`lmlab.moe.offload.tiers`). Policies (``OffloadConfig.policy``):

- ``resident``: every expert in a slot from the start (S = L E): the latency floor, and the memory ceiling.
- ``on_demand``: route block i, then load its selected experts synchronously (S = A).
- ``prefetch_all``: while block i runs, load all E experts of block i+1 (S = E + A); prefetched experts the block
  turns out not to need are dropped once its routing is known.
- ``pregated``: block i's pre-gate names block i+1's experts; they are loaded while block i's experts compute
  and block i+1's attention runs, asynchronously (CPU tiers: a copier, below; cuda tier: a side CUDA stream),
  double-buffered: S = 2A (block i's experts + block i+1's), the paper's system design. Needs a pre-gated model.
  Block 0 has no predecessor: its experts load on demand.

Within a block the experts run in increasing id order, each as soon as its own bytes are in (:meth:`claim` issues
the block's loads and the next block's prefetch, then :meth:`wait_for` gates each expert), so on a serial link the
first expert computes while the next still arrives; the next block's prefetch is queued right behind this block's
misses rather than after waiting for them.

On the CPU tiers the asynchronous copies (prefetch_all, pregated) run in a copy process by default
(:class:`~lmlab.moe.offload.copier.ProcessCopier`: the resident set lives in shared memory and a child process
``preadv``-s experts into it, standing in for a GPU's copy engine), or on a Python thread (``copier="thread"``,
:class:`~lmlab.moe.offload.copier.ThreadCopier`: any tier, but it shares the decoding thread's GIL).

``lru_slots`` adds that many slots that keep recently used experts (mixtral-offloading's LRU cache); a needed
expert found there costs nothing. With ``lru_slots=0`` a slot is freed as soon as its block is done.

A needed expert is a **hit** (resident and loaded), **late** (its prefetch is still in flight: we wait just before
it runs, and count the wait as stall; a prefetch the thread copier has not started yet is run by the decode thread
itself) or a **miss** (not requested before: loaded on demand, counted, its wait also stall). Every policy runs
the same expert arithmetic in the same order (:meth:`OffloadEngine._moe`), so for the same routing the outputs
are bitwise identical across policies and tiers on one device (tested token by token).

Prompts of unequal length are left-padded: a row's padding positions attend only to themselves, never route, load
or run an expert, and are masked from the row's real positions; its positions count from its first real token, so
each row's continuation is the one it gets alone (tested).

The prompt is prefilled in one pass per block: attention over all its tokens at once, and the block's experts (the
union over the prompt) streamed through the resident set A at a time, on demand, so every policy's budget holds
for any prompt length. Its time and loads are reported apart (``prefill_*``); the other counters and the latencies
are the decode's, the paper's metrics. Official code: ranggihwang/Pregated_MoE (C++/CUDA, FasterTransformer).
"""

from __future__ import annotations

import collections
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from lmlab.errors import ConfigError
from lmlab.moe.experts import ACTIVATIONS
from lmlab.moe.offload.copier import (
    COPIERS,
    THREAD_NAME,
    ProcessCopier,
    ThreadCopier,
    process_copier_available,
    process_evicts,
)
from lmlab.moe.offload.store import ExpertStore
from lmlab.moe.offload.tiers import PageCacheTier

POLICIES = ("resident", "on_demand", "prefetch_all", "pregated")
# Bumped when a change moves the engine's latencies; benchmarks record it, so results from another revision
# (e.g. GPU runs that could not be repeated) are labelled as such. 2: each expert runs as soon as it arrives, and
# the next block's prefetch is issued before this block's wait (1: after waiting for all of this block's experts).
ENGINE_REVISION = 2
__all__ = ["ENGINE_REVISION", "POLICIES", "THREAD_NAME", "BudgetError", "GenerationResult", "OffloadConfig",
           "OffloadEngine", "OffloadMetrics", "ResidentSet"]


def _sleep_until(t: float) -> None:
    """Sleep until ``time.perf_counter() >= t``: OS sleep for all but the last ms, then yield-spin (a loaded
    machine can wake a sleeping thread milliseconds late)."""
    while (left := t - time.perf_counter()) > 0:
        time.sleep(left - 0.001 if left > 0.002 else 0)


class BudgetError(RuntimeError):
    """The resident set has no free slot: an engine bug (budgets are sized so this cannot happen)."""


@dataclass(frozen=True)
class OffloadConfig:
    policy: str = "pregated"  # resident | on_demand | prefetch_all | pregated
    lru_slots: int = 0  # extra slots kept as an LRU cache of recent experts (0: free a slot when its block ends)
    max_batch: int = 1  # sizes the resident set: A = min(E, max_batch * k); batch 1 is the paper's setting
    device: str = "cpu"  # where the resident set and the non-expert weights live ("cuda" with the cuda tier)
    # CPU tiers' asynchronous copies (prefetch_all, pregated): "process" (a child process, the default where
    # available), "thread" (a Python thread; any tier), "auto" (process if the platform and tier allow it)
    copier: str = "auto"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.copier not in COPIERS:
            raise ConfigError(f"unknown copier {self.copier!r}; choose one of {', '.join(COPIERS)}")
        if self.lru_slots < 0 or self.max_batch < 1:
            raise ConfigError("lru_slots must be >= 0 and max_batch >= 1")


@dataclass
class OffloadMetrics:
    """One :meth:`OffloadEngine.generate` call (latencies are decode steps: one new token for every row)."""

    policy: str
    tier: dict
    lru_slots: int
    batch: int
    prompt_tokens: int
    new_tokens: int
    token_latency_s: list[float]
    block_latency_s: list[float]  # per decode step, the time in the L blocks (CPU only; the rest is embedding + head)
    slots: int  # S, the fixed size of the resident set
    slot_bytes: int  # S * bytes per expert: allocated fast memory for experts
    peak_resident_experts: int  # most slots holding (or loading) an expert at once
    peak_resident_bytes: int
    active_experts_per_block: int  # A: the most one block needed in one step (peak memory target: <= 2 A)
    bytes_moved: int  # through the tier, prefetches included (used or not)
    loads: int
    prefetches: int  # loads issued ahead of need
    hits: int
    late: int
    misses: int
    misses_per_block: list[int]
    stall_s: float | None  # host time waiting for experts, all steps (None on CUDA: waits happen on the device)
    steps: int  # decode steps run: new tokens - 1 (the first new token comes from the prefill)
    stolen: int  # prefetches the main thread ran itself because the thread copier had not started them
    setup_s: float  # loading the resident set / pinning host copies (engine creation), not in latencies
    wall_s: float = 0.0
    prefill_s: float = 0.0  # the prompt's pass: time to the first new token
    prefill_loads: int = 0  # experts the prefill loaded (on demand, A at a time); not in the decode counters above
    prefill_bytes: int = 0
    prefill_stall_s: float | None = None
    copier: str = "none"  # who ran the asynchronous CPU copies: process, thread, or none (sync only / cuda)

    @property
    def needed(self) -> int:
        return self.hits + self.late + self.misses

    @property
    def hit_rate(self) -> float:
        """Needed experts that were resident or already being prefetched, over all needed experts."""
        return (self.hits + self.late) / self.needed if self.needed else float("nan")

    @property
    def stall_per_step_s(self) -> float | None:
        return None if self.stall_s is None else self.stall_s / max(1, self.steps)

    @property
    def median_latency_s(self) -> float:
        return statistics.median(self.token_latency_s) if self.token_latency_s else float("nan")

    @property
    def median_block_latency_s(self) -> float:
        return statistics.median(self.block_latency_s) if self.block_latency_s else float("nan")

    @property
    def mean_latency_s(self) -> float:
        return statistics.fmean(self.token_latency_s) if self.token_latency_s else float("nan")

    @property
    def tokens_per_s(self) -> float:
        total = sum(self.token_latency_s)
        return self.batch * len(self.token_latency_s) / total if total else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, stall_per_step_s=self.stall_per_step_s, median_latency_s=self.median_latency_s,
                 mean_latency_s=self.mean_latency_s, tokens_per_s=self.tokens_per_s, needed=self.needed)
        return d


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (B, new_tokens) greedy continuation
    metrics: OffloadMetrics
    logits: list[torch.Tensor] = field(default_factory=list)  # per step (B, V) when asked for


class ResidentSet:
    """S preallocated expert slots in fast memory, a key -> slot table, pins and an LRU of unpinned slots.

    Only the engine's main thread reserves, pins and frees slots; a copier only fills reserved slots, so the table
    needs no lock. ``flat`` is the slot memory when a copier provides it (shared memory for the copy process).
    """

    def __init__(self, num_slots: int, store: ExpertStore, *, device: torch.device, keep_unpinned: bool,
                 flat: torch.Tensor | None = None):
        s = num_slots
        if flat is None:
            flat = torch.empty(s, store.expert_numel, dtype=store.dtype, device=device)  # one row per slot
        self.flat = flat
        self.w1, self.b1, self.w2, self.b2 = store.unflatten(self.flat)  # (S, D, H), (S, H), (S, H, D), (S, D)
        self.num_slots = s
        self.keep_unpinned = keep_unpinned
        self.key: list[tuple[int, int] | None] = [None] * s
        self.table: dict[tuple[int, int], int] = {}
        self.pins = [0] * s
        self.free = list(range(s - 1, -1, -1))
        self.lru: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.ready_at = [0.0] * s  # CPU tiers: perf_counter instant the tier says the bytes arrive (emulated link)
        self.cuda_ready: list = [None] * s  # cuda tier: event recorded after the copy
        self.cuda_free: list = [None] * s  # cuda tier: event recorded after the slot's last use
        self.peak = 0

    def tensors(self, slot: int) -> torch.Tensor:
        """The slot's row: where a tier copies an expert's span."""
        return self.flat[slot]

    @property
    def occupied(self) -> int:
        return len(self.table)

    def reserve(self, key: tuple[int, int]) -> int:
        """A slot for ``key`` (not resident): a free one, else the least recently used unpinned one; pinned once."""
        if self.free:
            slot = self.free.pop()
        elif self.lru:
            slot, _ = self.lru.popitem(last=False)
            del self.table[self.key[slot]]
        else:
            raise BudgetError(f"all {self.num_slots} expert slots are pinned")
        self.key[slot] = key
        self.table[key] = slot
        self.pins[slot] = 1
        self.ready_at[slot] = 0.0
        self.cuda_ready[slot] = None
        self.peak = max(self.peak, len(self.table))
        return slot

    def pin(self, slot: int) -> None:
        self.pins[slot] += 1
        self.lru.pop(slot, None)

    def unpin(self, slot: int) -> None:
        self.pins[slot] -= 1
        if self.pins[slot] == 0:
            if self.keep_unpinned:
                self.lru[slot] = None  # most recently used at the end
            else:
                self.drop(slot)

    def drop(self, slot: int) -> None:
        """Forget the slot's expert (cancelled prefetch, or no cache): it goes back to the free list."""
        key = self.key[slot]
        if key is not None:
            del self.table[key]
        self.key[slot] = None
        self.pins[slot] = 0
        self.lru.pop(slot, None)
        self.free.append(slot)


def _left_pad(input_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids (padding with 0 on the left) and each row's padding length (B,)."""
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, torch.Tensor)):
        rows = [torch.as_tensor(r, dtype=torch.long).flatten() for r in input_ids]
        if any(len(r) == 0 for r in rows):
            raise ConfigError("every prompt needs at least one token")
        p = max(len(r) for r in rows)
        ids = torch.stack([torch.cat([r.new_zeros(p - len(r)), r]) for r in rows])
        return ids, torch.tensor([p - len(r) for r in rows])
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2:
        raise ConfigError(f"prompts must be (batch, tokens) ids; got shape {tuple(ids.shape)}")
    return ids, torch.zeros(ids.shape[0], dtype=torch.long)


class OffloadEngine:
    """Greedy generation with offloaded experts; use as a context manager (or call :meth:`close`).

    ``OffloadEngine(model, store, tier=LinkTier(8.0), config=OffloadConfig(policy="pregated"))``; ``store`` is an
    :class:`ExpertStore` or the path of one written by :func:`~lmlab.moe.offload.save_expert_store`. The engine
    moves the model's non-expert modules to ``config.device`` and never reads the model's own expert weights.
    """

    def __init__(self, model, store, *, tier=None, config: OffloadConfig | None = None):
        self.config = config or OffloadConfig()
        self.model = model.eval()
        mc = model.config
        if self.config.policy == "pregated" and not mc.pregated:
            raise ConfigError("the pregated policy needs a pre-gated model (config.pregated=True); use on_demand "
                              "or prefetch_all for a conventional MoE")
        self._own_store = not isinstance(store, ExpertStore)
        self.store = ExpertStore(store) if self._own_store else store
        self._copier = None  # copies issued ahead of need on a CPU tier (prefetch_all, pregated)
        self._tier_open = False
        try:
            self._setup(model, tier)
        except BaseException:  # a failed construction must not leak the store's descriptor or the copier's process
            self._close_parts()
            raise

    def _setup(self, model, tier) -> None:
        """The rest of construction, after the store is open (``__init__`` closes what this opened if it raises)."""
        mc = model.config
        self.store.check_model(model)
        self.tier = tier or PageCacheTier()
        self.device = torch.device(self.config.device)
        if (self.tier.name == "cuda") != (self.device.type == "cuda"):
            raise ConfigError("use the cuda tier with device='cuda', and a CPU tier with device='cpu'")
        self.act = ACTIVATIONS[self.store.activation]
        self.num_layers, self.num_experts, self.k = mc.num_hidden_layers, mc.num_experts, mc.num_experts_per_tok
        self.active = min(self.num_experts, self.config.max_batch * self.k)  # A
        base = {"resident": self.num_layers * self.num_experts, "on_demand": self.active,
                "prefetch_all": self.num_experts + self.active, "pregated": 2 * self.active}[self.config.policy]
        lru = 0 if self.config.policy == "resident" else self.config.lru_slots
        t0 = time.perf_counter()
        kind = self._copier_kind()
        if kind == "process":
            try:
                self._copier = ProcessCopier(self.store, base + lru, evict=bool(process_evicts(self.tier)))
            except OSError as e:  # no child processes here (a sandbox, no sys.executable): the thread still works
                if self.config.copier == "process":
                    raise ConfigError(f"cannot start the expert copy process ({e}); use copier='thread'") from None
                kind = "thread"
        self.pool = ResidentSet(base + lru, self.store, device=self.device,
                                keep_unpinned=lru > 0 or self.config.policy == "resident",
                                flat=None if self._copier is None else self._copier.flat)
        if kind == "thread":
            self._copier = ThreadCopier(self.tier, self.store, self.pool.tensors)
        for _name, mod in self._fast_modules():
            mod.to(self.device)
        self._held: dict[int, list[int]] = collections.defaultdict(list)  # block -> slots pinned for it
        self._unready: set[int] = set()  # CPU tiers: claimed slots whose expert may not have arrived yet
        self._block_s: list[float] = []  # per decode step: time in the blocks
        self._stop = False
        self._reset_counters()
        self._tier_open = True
        self.tier.open(self.store)
        if self.config.policy == "resident":
            for layer in range(self.num_layers):
                for e in range(self.num_experts):
                    slot = self.pool.reserve((layer, e))
                    self._load_now(slot, (layer, e))
                    _sleep_until(self.pool.ready_at[slot])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.setup_s = time.perf_counter() - t0

    # ----- plumbing ----------------------------------------------------------------------------------------
    def _copier_kind(self) -> str | None:
        """Which copier runs this engine's asynchronous CPU copies (None: no asynchronous CPU copies)."""
        want = self.config.copier
        if self.tier.asynchronous or self.config.policy not in ("prefetch_all", "pregated"):
            return None
        can = process_copier_available() and process_evicts(self.tier) is not None
        if want == "process" and not can:
            raise ConfigError(f"copier='process' needs Linux and a built-in CPU tier (mmap, disk, link); tier "
                              f"{type(self.tier).__name__} on {sys.platform}: use copier='thread'")
        return "process" if want == "process" or (want == "auto" and can) else "thread"

    def _fast_modules(self):
        m = self.model
        yield "embed_tokens", m.embed_tokens
        yield "norm", m.norm
        yield "lm_head", m.lm_head
        for i, blk in enumerate(m.layers):
            for name in ("attn_norm", "attn", "mlp_norm", "router", "pregate"):
                mod = getattr(blk, name)
                if mod is not None:
                    yield f"layers.{i}.{name}", mod

    def _reset_counters(self) -> None:
        self.bytes_moved = self.loads = self.prefetches = self.hits = self.late = self.misses = 0
        self.misses_per_block = [0] * self.num_layers
        self.stall_s = 0.0
        self.max_needed = 0
        self.stolen = 0

    def _load_async(self, slot: int, key: tuple[int, int]) -> None:
        """Queue a copy on the asynchronous (CUDA) tier; the slot is ready when its event fires."""
        self.pool.cuda_ready[slot] = self.tier.load(self.store, *key, self.pool.tensors(slot),
                                                    after=self.pool.cuda_free[slot])
        self.bytes_moved += self.store.expert_bytes

    def _load_now(self, slot: int, key: tuple[int, int]) -> None:
        self.loads += 1
        if self.tier.asynchronous:
            self._load_async(slot, key)
        else:
            self.pool.ready_at[slot] = self.tier.reserve(self.store.expert_bytes)
            self.bytes_moved += self.tier.load(self.store, *key, self.pool.tensors(slot))  # usable from ready_at

    def prefetch(self, layer: int, experts) -> None:
        """Start loading ``experts`` of ``layer`` (pinned for that block); resident ones are only pinned."""
        jobs = []
        for e in experts:
            key = (layer, int(e))
            slot = self.pool.table.get(key)
            if slot is not None:
                self.pool.pin(slot)
            else:
                slot = self.pool.reserve(key)
                self.prefetches += 1
                self.loads += 1
                if self.tier.asynchronous:
                    self._load_async(slot, key)
                else:
                    self.pool.ready_at[slot] = self.tier.reserve(self.store.expert_bytes)  # issued now
                    self.bytes_moved += self.store.expert_bytes
                    jobs.append((slot, key))
            self._held[layer].append(slot)
        if jobs:
            self._copier.submit(jobs)

    def _pending(self, slot: int) -> bool:
        """Whether a copier still owes ``slot``'s bytes (raises a failed copy's error)."""
        return self._copier is not None and self._copier.pending(slot)

    def cancel(self) -> int:
        """Drop queued (not yet started) prefetches and free their slots; returns how many were dropped.
        (The thread copier can drop what it has not started; the process copier's jobs are all in flight.)"""
        dropped = self._copier.cancel() if self._copier is not None else []
        for slot, key in dropped:
            held = self._held.get(key[0], [])
            while slot in held:
                held.remove(slot)
            self._forget_prefetch(slot)
        return len(dropped)

    def _settle(self) -> None:
        """Undo what a generate interrupted mid-step (Ctrl-C, a failed copy) left behind, so the next generate starts
        from a consistent resident set: queued prefetches are dropped, copies in flight waited for, and every slot
        still pinned is forgotten, not cached (the interrupt may have come between reserving a slot and loading it;
        between generates no slot is pinned). Without it, the next generate ran out of slots or used a slot whose
        expert was never loaded."""
        if not self._held and not self._unready:
            return
        self.cancel()
        if self.config.policy != "resident":  # (resident slots are loaded at construction and stay pinned)
            for slot in range(self.pool.num_slots):
                if self.pool.pins[slot] > 0:
                    if self._pending(slot):
                        self._copier.wait(slot)
                    self.pool.drop(slot)
        self._held.clear()
        self._unready.clear()

    def _forget_prefetch(self, slot: int) -> None:
        """A prefetch cancelled before it started: take back what :meth:`prefetch` counted and free its slot."""
        self.loads -= 1
        self.prefetches -= 1
        self.bytes_moved -= self.store.expert_bytes
        self.pool.drop(slot)

    def ensure(self, layer: int, experts) -> dict[int, int]:
        """Make ``experts`` of ``layer`` usable; returns expert -> slot. Counts hits, late prefetches and misses.

        Misses are loaded here, all issued before the wait for them (the link is serial anyway). Decoding uses
        :meth:`claim` and :meth:`wait_for` instead, to start on the first expert while the next still arrives.
        """
        slots = self.claim(layer, experts)
        for slot in slots.values():
            self.wait_for(slot)
        return slots

    def claim(self, layer: int, experts, *, then_prefetch: tuple[int, object] | None = None) -> dict[int, int]:
        """Pin ``experts`` of ``layer`` and issue loads for the missing ones, without waiting; returns expert ->
        slot. Each slot must pass :meth:`wait_for` before its expert runs. Counts hits, late prefetches and misses.

        ``then_prefetch=(next_layer, next_experts)`` issues that prefetch after this block's misses: the next block's
        copies go on the link right behind this block's, not when this thread wakes from waiting for them (on the
        CPU a wake-up comes tens of microseconds late, and at r = 1 the link has no slack to absorb it).
        """
        slots = {}
        held = self._held[layer]
        cpu = not self.tier.asynchronous
        for e in experts:
            key = (layer, int(e))
            slot = self.pool.table.get(key)
            if slot is None:  # miss: load now (on the CPU tiers the bytes are copied on this thread)
                self.misses += 1
                self.misses_per_block[layer] += 1
                slot = self.pool.reserve(key)
                held.append(slot)
                t0 = time.perf_counter()
                self._load_now(slot, key)
                if cpu:
                    self.stall_s += time.perf_counter() - t0
                    self._unready.add(slot)
            else:
                if slot not in held:
                    self.pool.pin(slot)
                    held.append(slot)
                if not cpu:
                    ev = self.pool.cuda_ready[slot]
                    if ev is None or ev.query():
                        self.hits += 1
                    else:
                        self.late += 1
                elif not self._pending(slot) and self.pool.ready_at[slot] <= time.perf_counter():
                    self.hits += 1
                else:
                    self.late += 1
                    self._unready.add(slot)
            slots[int(e)] = slot
        self._drop_unneeded(layer, set(slots.values()))  # prefetch_all: frees the slots the next prefetch needs
        if then_prefetch is not None:
            self.prefetch(*then_prefetch)
        self.max_needed = max(self.max_needed, len(slots))
        return slots

    def wait_for(self, slot: int) -> None:
        """Block until a claimed slot's expert is usable (CPU: its copy is done and the tier's time has come;
        cuda: the compute stream waits for the copy's event). Time waited on the CPU counts as stall."""
        if self.tier.asynchronous:
            if self.pool.cuda_ready[slot] is not None:
                torch.cuda.current_stream(self.device).wait_event(self.pool.cuda_ready[slot])
            return
        if slot not in self._unready:
            return
        self._unready.discard(slot)
        t0 = time.perf_counter()
        if self._pending(slot):
            self.stolen += self._copier.wait(slot)  # the thread copier runs a queued job here
        _sleep_until(self.pool.ready_at[slot])
        self.stall_s += time.perf_counter() - t0

    def _drop_unneeded(self, layer: int, needed: set[int]) -> None:
        """Unpin what was prefetched for ``layer`` but is not needed (prefetch_all): queued loads are cancelled,
        a load in flight is waited for (a CPU slot cannot be reused while a copier writes it)."""
        held = self._held[layer]
        extra = [s for s in held if s not in needed]
        if not extra:
            return
        cancelled = {job[0] for job in self._copier.cancel(set(extra))} if self._copier is not None else set()
        for slot in extra:
            if slot in cancelled:
                self._forget_prefetch(slot)
                continue
            if self._pending(slot):
                t0 = time.perf_counter()
                self._copier.wait(slot)  # the copier writes this slot: wait before freeing it
                self.stall_s += time.perf_counter() - t0
            self.pool.unpin(slot)
        self._held[layer] = [s for s in held if s in needed]

    def release(self, layer: int) -> None:
        """Block ``layer`` is done with its experts: unpin them (kept in the LRU, or freed)."""
        for slot in self._held.pop(layer, []):
            self._unready.discard(slot)  # (claimed but never run: nothing to wait for any more)
            if self.tier.asynchronous:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                self.pool.cuda_free[slot] = ev
            if self.config.policy != "resident":
                self.pool.unpin(slot)

    # ----- the model ----------------------------------------------------------------------------------------
    def _route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert_index, gates), each (B, T, k): the model's routing (:func:`lmlab.moe.token_choice.top_k_routing`
        with no capacity limit, so nothing is dropped) without its capacity bookkeeping, which decode does not need.
        Same operations in the same order, so the same values (tested against ``model.route``)."""
        probs = torch.softmax(logits.float(), dim=-1).to(logits.dtype)  # V-MoE Eq. 1
        gates, idx = probs.topk(self.k, dim=-1)
        if self.model.config.renormalize_gates:
            gates = gates / gates.sum(-1, keepdim=True)
        return idx, gates

    def _moe(self, u: torch.Tensor, routing: tuple[torch.Tensor, torch.Tensor], slots: dict[int, int],
             live: torch.Tensor | None = None, out: torch.Tensor | None = None, wait: bool = False) -> torch.Tensor:
        """Gate-weighted sum of the selected experts, expert by expert in increasing id (fixed order for all
        policies). u (B, T, D) -> (B, T, D); tokens where ``live`` (B, T) is False (padding) get 0. ``out``
        (B*T, D) continues a sum over earlier experts (prefill streams a block's experts in groups). ``wait``: each
        slot passes :meth:`wait_for` just before its expert runs (slots from :meth:`claim`)."""
        b, t, d = u.shape
        x = u.reshape(-1, d)
        idx = routing[0].reshape(x.shape[0], -1)
        gates = routing[1].reshape(x.shape[0], -1)
        if live is not None:  # padding tokens: route them nowhere
            idx = idx.masked_fill(~live.reshape(-1, 1), -1)
        p = self.pool
        if x.shape[0] == 1 and out is None:  # batch-1 decode: no gather/scatter, same arithmetic in the same order
            choice = {e: j for j, e in enumerate(idx[0].tolist())}
            y = torch.zeros_like(x)
            for e in sorted(slots):
                s, j = slots[e], choice[e]
                if wait:
                    self.wait_for(s)
                h = self.act(torch.addmm(p.b1[s], x, p.w1[s]))
                y = y + torch.addmm(p.b2[s], h, p.w2[s]) * gates[:, j:j + 1]
            return y.view(b, t, d)
        y = torch.zeros_like(x) if out is None else out
        for e in sorted(slots):
            s = slots[e]
            if wait:
                self.wait_for(s)
            rows, j = (idx == e).nonzero(as_tuple=True)
            h = self.act(torch.addmm(p.b1[s], x[rows], p.w1[s]))
            y.index_add_(0, rows, torch.addmm(p.b2[s], h, p.w2[s]) * gates[rows, j].unsqueeze(-1))
        return y.view(b, t, d)

    @staticmethod
    def _experts_of(routing, live: torch.Tensor | None) -> list[int]:
        idx = routing[0] if live is None else routing[0][live]
        return sorted(set(idx.flatten().tolist()))

    def _prefill(self, ids: torch.Tensor, caches, cos, sin, real=None) -> torch.Tensor:
        """The whole prompt (B, P) in one pass per block: attention fills the KV cache, and each block's experts
        (the union over the prompt's tokens, from its router or its predecessor's pre-gate) stream through the
        resident set A at a time, on demand, each group's slots released before the next: the budget of every
        policy holds. Returns the last position's logits (B, V). ``real`` (B, L) marks real tokens when prompts
        are left-padded (else None)."""
        m = self.model
        x = m.embed_tokens(ids)  # (B, P, D)
        b, p, d = x.shape
        live = None if real is None else real[:, :p]
        next_routing = None
        for i, blk in enumerate(m.layers):
            x = blk.attend(x, cos, sin, cache=caches[i], start=0, real=real)
            u = blk.mlp_norm(x)
            routing = self._route(blk.router(u)) if blk.router is not None else next_routing
            next_routing = self._route(blk.pregate(u)) if blk.pregate is not None else None
            experts = self._experts_of(routing, live)
            y = torch.zeros(b * p, d, device=x.device, dtype=x.dtype)
            for g in range(0, len(experts), self.active):
                slots = self.ensure(i, experts[g:g + self.active])
                self._moe(u, routing, slots, live, out=y)
                self.release(i)
            x = x + y.view(b, p, d)
        return m.lm_head(m.norm(x[:, -1:]))[:, -1]

    def _step(self, col: torch.Tensor, pos: int, caches, cos, sin, real=None) -> torch.Tensor:
        """One token for every row. ``real`` (B, L) only with left padding (else None)."""
        m, policy = self.model, self.config.policy
        live = None if real is None else real[:, pos:pos + 1]
        x = m.embed_tokens(col)  # (B, 1, D)
        next_routing = None
        t0 = time.perf_counter()
        for i, blk in enumerate(m.layers):
            x = blk.attend(x, cos, sin, cache=caches[i], start=pos, real=real)
            u = blk.mlp_norm(x)
            routing = self._route(blk.router(u)) if blk.router is not None else next_routing
            next_routing = self._route(blk.pregate(u)) if blk.pregate is not None else None  # block i+1's experts
            # overlap block i+1's transfer with block i's experts + block i+1's attention
            ahead = None
            if i + 1 < self.num_layers and policy == "pregated":
                ahead = (i + 1, self._experts_of(next_routing, live))
            elif i + 1 < self.num_layers and policy == "prefetch_all":
                ahead = (i + 1, range(self.num_experts))
            slots = self.claim(i, self._experts_of(routing, live), then_prefetch=ahead)
            x = x + self._moe(u, routing, slots, live, wait=True)  # each expert runs as soon as it has arrived
            self.release(i)
        if self.device.type == "cpu":  # (on a GPU the host's clock says nothing without a sync)
            self._block_s.append(time.perf_counter() - t0)
        return m.lm_head(m.norm(x))[:, -1]

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, *, return_logits: bool = False) -> GenerationResult:
        """Greedy continuation of prompts: ``input_ids`` is a (B, P) tensor, one list of ids, or a list of id lists
        of any lengths (left-padded; each row continues as it would alone)."""
        from lmlab.moe.pregated import KVCache, rotary

        if self._stop:
            raise ConfigError("this engine is closed")
        self._settle()
        ids, pad = _left_pad(input_ids)
        b, p = ids.shape
        if b > self.config.max_batch:
            raise ConfigError(f"batch {b} exceeds the engine's max_batch={self.config.max_batch}")
        if p < 1 or max_new_tokens < 1:
            raise ConfigError("need at least one prompt token and max_new_tokens >= 1")
        mc = self.model.config
        total = p + max_new_tokens
        if total > mc.max_position_embeddings:
            raise ConfigError(f"prompt + new tokens ({total}) exceed max_position_embeddings "
                              f"({mc.max_position_embeddings})")
        ids = ids.to(self.device)
        dtype = self.model.lm_head.weight.dtype
        hd = mc.hidden_size // mc.num_attention_heads
        caches = [KVCache(b, mc.num_attention_heads, total, hd, device=self.device, dtype=dtype)
                  for _ in range(self.num_layers)]
        # with left padding, each row's positions count from its first real token and its padding is masked
        pad = pad.to(self.device)
        steps = torch.arange(total, device=self.device)
        real = steps[None, :] >= pad[:, None] if bool(pad.any()) else None  # (B, total)
        cos, sin = rotary(steps, hd, mc.rope_theta)
        row_pos = (steps[None, :] - pad[:, None]).clamp(min=0)  # (B, total) each cache position's rotary position
        cos, sin = cos[row_pos][:, None], sin[row_pos][:, None]  # (B, 1, total, head_dim)
        self._reset_counters()
        self.pool.peak = self.pool.occupied
        cuda = self.device.type == "cuda"
        t_start = time.perf_counter()
        logits = self._prefill(ids, caches, cos[:, :, :p], sin[:, :, :p], real)  # its logits give the first token
        col = logits.argmax(-1, keepdim=True)
        if cuda:
            torch.cuda.synchronize(self.device)
        prefill_s = time.perf_counter() - t_start
        prefill_loads, prefill_bytes, prefill_stall = self.loads, self.bytes_moved, None if cuda else self.stall_s
        self._reset_counters()  # the counters below are the decode's (the paper's metrics)
        new, lat, self._block_s = [col], [], []
        all_logits = [logits.detach().cpu()] if return_logits else []
        for pos in range(p, total - 1):  # decode: one token per step
            t0 = time.perf_counter()
            logits = self._step(col, pos, caches, cos[:, :, pos:pos + 1], sin[:, :, pos:pos + 1], real)
            col = logits.argmax(-1, keepdim=True)
            if cuda:
                torch.cuda.synchronize(self.device)
            lat.append(time.perf_counter() - t0)
            new.append(col)
            if return_logits:
                all_logits.append(logits.detach().cpu())
        wall = time.perf_counter() - t_start
        s = self.store.expert_bytes
        metrics = OffloadMetrics(
            policy=self.config.policy, tier=self.tier.describe(), lru_slots=self.config.lru_slots, batch=b,
            prompt_tokens=p, new_tokens=len(new), token_latency_s=lat, block_latency_s=self._block_s,
            slots=self.pool.num_slots,
            slot_bytes=self.pool.num_slots * s, peak_resident_experts=self.pool.peak,
            peak_resident_bytes=self.pool.peak * s, active_experts_per_block=self.max_needed,
            bytes_moved=self.bytes_moved, loads=self.loads, prefetches=self.prefetches, hits=self.hits,
            late=self.late, misses=self.misses, misses_per_block=list(self.misses_per_block),
            stall_s=None if cuda else self.stall_s, steps=len(lat), stolen=self.stolen, setup_s=self.setup_s,
            wall_s=wall, prefill_s=prefill_s, prefill_loads=prefill_loads, prefill_bytes=prefill_bytes,
            prefill_stall_s=prefill_stall, copier=self._copier.kind if self._copier is not None else "none")
        return GenerationResult(tokens=torch.cat(new, dim=1).cpu(), metrics=metrics, logits=all_logits)

    # ----- shutdown -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Cancel queued prefetches, stop the copier (join its thread or reap its process), close the tier and the
        store."""
        if self._stop:
            return
        self._stop = True
        self.cancel()
        self._close_parts()

    def _close_parts(self) -> None:
        """Stop the copier, close the tier (if opened) and the store (if this engine opened it)."""
        if self._copier is not None:
            self._copier.close()
        if self._tier_open:
            self.tier.close()
        if self._own_store:
            self.store.close()

    def __enter__(self) -> OffloadEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
