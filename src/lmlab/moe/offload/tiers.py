"""Where experts come from when they are not resident: the transfer tiers of the offloaded engine.

Every CPU tier copies one expert (w1, b1, w2, b2) from an :class:`~lmlab.moe.offload.store.ExpertStore` into a
slot of the resident set (``load``, returns the bytes moved). ``reserve`` is called when the transfer is issued and
returns the ``time.perf_counter()`` instant from which the expert may be used (0.0: as soon as ``load`` returns).

- :class:`PageCacheTier` (``"mmap"``): copy from the memory map; after the first touch the bytes come from the
  OS page cache, so this is the fastest slow tier (host RAM bandwidth).
- :class:`DiskTier` (``"disk"``): real disk reads: the expert's byte range is evicted from the page cache
  (``posix_fadvise(DONTNEED)``) and read back with ``pread``.
- :class:`LinkTier` (``"link"``): a bandwidth-limited link of ``gbps`` GB/s and a fixed per-transfer latency,
  modelling PCIe or an SSD on a CPU-only machine. The link is serial (one transfer at a time, FIFO): a transfer
  reserves it when issued (like a DMA engine starting when the copy is enqueued) from ``max(now, busy_until)``
  for ``latency + bytes / bandwidth``; ``load`` copies the bytes, and the engine's consumer sleeps until the
  reserved end if it needs the expert earlier. (A time-line model rather than a copy thread that sleeps: on a
  shared CPU every extra thread wake-up costs scheduler latency that a DMA engine would not.)
- :class:`CudaTier` (``"cuda"``): the paper's setting: experts in pinned CPU memory, copied to GPU slots with
  ``non_blocking=True`` on a side CUDA stream; readiness is a CUDA event the compute stream waits on.

CPU-emulation caveat: on a GPU the copy engine moves bytes without the SM or the host CPU; in the emulated link
the bytes are still copied by a CPU core: by the engine's copy process for prefetches (its own core and GIL, the
nearest stand-in for a DMA engine; see :mod:`lmlab.moe.offload.copier`), by the decoding thread itself for
on-demand loads. The link's time (latency + bytes / bandwidth) is a reserved time-line on top of that copy.
"""

from __future__ import annotations

import math
import os
import threading
import time

import torch

from lmlab.errors import ConfigError
from lmlab.moe.offload.store import ExpertStore

TIERS = ("mmap", "disk", "link", "cuda")


class PageCacheTier:
    name = "mmap"
    asynchronous = False  # load() copies before it returns (on the engine's thread copier or its main thread)

    def open(self, store: ExpertStore) -> None:
        pass

    def reserve(self, nbytes: int) -> float:
        return 0.0

    def load(self, store: ExpertStore, layer: int, expert: int, dst: torch.Tensor) -> int:
        dst.copy_(store.flat_view(layer, expert))  # one copy: the expert's span, in the file's layout
        return store.expert_bytes

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"tier": self.name}


class DiskTier(PageCacheTier):
    name = "disk"

    def open(self, store: ExpertStore) -> None:
        if not hasattr(os, "posix_fadvise"):
            raise ConfigError("the disk tier needs os.posix_fadvise (Linux) to evict the page cache")

    def load(self, store: ExpertStore, layer: int, expert: int, dst: torch.Tensor) -> int:
        store.evict(layer, expert)  # posix_fadvise(DONTNEED): the read below goes to the device
        return store.pread_into(layer, expert, dst)


class LinkTier(PageCacheTier):
    """A serial link of ``gbps`` GB/s (1e9 bytes/s) and ``latency_us`` per transfer (one expert = one transfer)."""

    name = "link"

    def __init__(self, gbps: float, *, latency_us: float = 10.0):
        if not (0 < gbps < math.inf and 0 <= latency_us < math.inf):  # NaN fails both
            raise ConfigError(f"link needs gbps > 0 and latency_us >= 0, got {gbps}, {latency_us}")
        self.gbps, self.latency_us = gbps, latency_us
        self._busy_until = 0.0
        self._lock = threading.Lock()

    def transfer_s(self, nbytes: int) -> float:
        return self.latency_us * 1e-6 + nbytes / (self.gbps * 1e9)

    def reserve(self, nbytes: int) -> float:
        """Book the serial link for one transfer issued now; returns when it completes."""
        with self._lock:
            start = max(time.perf_counter(), self._busy_until)
            self._busy_until = start + self.transfer_s(nbytes)
            return self._busy_until

    def describe(self) -> dict:
        return {"tier": self.name, "gbps": self.gbps, "latency_us": self.latency_us}


class CudaTier:
    """Pinned host copies of every expert, copied to the GPU on a side stream (``non_blocking``)."""

    name = "cuda"
    asynchronous = True  # load() only enqueues; it returns the CUDA event that marks completion

    def __init__(self, device: str | torch.device = "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("the cuda tier needs a CUDA GPU; use --tier link to emulate one on the CPU")
        self.device = torch.device(device)
        self.host: dict[tuple[int, int], torch.Tensor] = {}
        self.stream = None
        self._source = None

    def open(self, store: ExpertStore) -> None:
        """Pin every expert in host memory (once per store: an engine re-opening this tier reuses them)."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        if self.host and self._source == (str(store.path), store.file_size):
            return
        self.host.clear()
        self._source = (str(store.path), store.file_size)
        for layer in range(store.num_layers):
            for e in range(store.num_experts):
                self.host[(layer, e)] = store.flat_view(layer, e).pin_memory()  # the CPU-memory tier

    def load(self, store: ExpertStore, layer: int, expert: int, dst: torch.Tensor, *,
             after: torch.cuda.Event | None = None) -> torch.cuda.Event:
        """Enqueue the copy on the side stream after ``after`` (the slot's last use); returns its done event."""
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(self.host[(layer, expert)], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def close(self) -> None:
        """Wait for copies in flight; the pinned host copies stay for the next engine (``release`` frees them)."""
        if self.stream is not None:
            self.stream.synchronize()

    def release(self) -> None:
        self.close()
        self.host.clear()
        self._source = None

    def describe(self) -> dict:
        return {"tier": self.name, "device": torch.cuda.get_device_name(self.device)}


def make_tier(name: str, *, gbps: float = 8.0, latency_us: float = 10.0, device: str = "cuda"):
    """A tier by name: ``mmap``, ``disk``, ``link`` (with ``gbps``/``latency_us``) or ``cuda``."""
    if name == "mmap":
        return PageCacheTier()
    if name == "disk":
        return DiskTier()
    if name == "link":
        return LinkTier(gbps, latency_us=latency_us)
    if name == "cuda":
        return CudaTier(device)
    raise ConfigError(f"unknown tier {name!r}; choose one of {', '.join(TIERS)}")
