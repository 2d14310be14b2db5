"""Who moves an expert's bytes while the engine decodes: the CPU tiers' asynchronous copiers.

The engine (:mod:`lmlab.moe.offload.engine`) reserves a slot, then hands ``(slot, (layer, expert))`` jobs to a
copier and later asks whether a slot is still ``pending`` or ``wait``-s for it. Two copiers share that interface:

- :class:`ProcessCopier` (``copier="process"``, the default where it works): a small child process
  (:mod:`lmlab.moe.offload._copy_worker`, standard library only) ``preadv``-s each expert from the store file into
  the resident set, which lives in shared memory (a Linux memfd) so both processes see the same slots. It plays the
  part of a GPU's copy engine: the decoding thread pays one pipe write per block to start the copies and one
  non-blocking pipe read to learn which are done, and never shares its GIL with the copier.
- :class:`ThreadCopier` (``copier="thread"``): a background thread calling the tier's ``load`` (any tier, custom
  ones included). Simpler and portable, but the thread must take the GIL between copies; every hand-off wakes the
  decoding thread late (measured on the 2-core dev VM: +0.6 ms per token on an 8-block model with nothing copied).
  It can cancel queued jobs and lets the main thread run a queued job itself when it needs it first ("steal").

The process copier does the built-in CPU tiers' reads (``mmap`` and ``link``: a read from the page cache; ``disk``:
evict the range first); :func:`process_evicts` says which, and None for a tier it cannot stand in for.
"""

from __future__ import annotations

import collections
import mmap
import os
import select
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import torch

from lmlab.errors import ConfigError, DataError
from lmlab.moe.offload._copy_worker import DONE, JOB
from lmlab.moe.offload.store import ExpertStore
from lmlab.moe.offload.tiers import DiskTier, PageCacheTier

THREAD_NAME = "lmlab-expert-prefetch"
COPIERS = ("auto", "process", "thread")


def process_evicts(tier) -> bool | None:
    """For a tier whose loads the copy process can do: whether it evicts the page cache first (the disk tier);
    None for any other tier (a custom ``load``, the cuda tier)."""
    load = getattr(type(tier), "load", None)
    if load is PageCacheTier.load:  # mmap and link (the link's time is a time-line kept by the engine)
        return False
    if load is DiskTier.load:
        return True
    return None


def process_copier_available() -> bool:
    return hasattr(os, "memfd_create") and hasattr(os, "preadv")


class ThreadCopier:
    """Copies on a background thread through ``tier.load``; ``dst_of(slot)`` is the slot's tensor."""

    kind = "thread"

    def __init__(self, tier, store: ExpertStore, dst_of):
        self.tier, self.store, self.dst_of = tier, store, dst_of
        self._jobs: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._done: dict[int, threading.Event] = {}  # slot -> set when its bytes are in
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                slot, key = self._jobs.popleft()
            try:
                self.tier.load(self.store, *key, self.dst_of(slot))
            except BaseException as e:  # noqa: BLE001 - re-raised on the engine's thread by check()
                self._error = e
            finally:
                self._done[slot].set()

    def submit(self, jobs: list[tuple[int, tuple[int, int]]]) -> None:
        with self._cv:
            for slot, _ in jobs:
                self._done[slot] = threading.Event()
            self._jobs.extend(jobs)
            self._cv.notify()

    def check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def pending(self, slot: int) -> bool:
        self.check()
        ev = self._done.get(slot)
        return ev is not None and not ev.is_set()

    def wait(self, slot: int) -> bool:
        """Block until ``slot``'s bytes are in; if the thread has not started the job, run it here (returns True)."""
        with self._cv:
            job = next((j for j in self._jobs if j[0] == slot), None)
            if job is not None:
                self._jobs.remove(job)
        if job is not None:
            self.tier.load(self.store, *job[1], self.dst_of(slot))
            self._done[slot].set()
        else:
            self._done[slot].wait()
        self.check()
        return job is not None

    def cancel(self, slots=None) -> list[tuple[int, tuple[int, int]]]:
        """Drop queued jobs (of ``slots``, or all) the thread has not started; returns them."""
        with self._cv:
            dropped = [j for j in self._jobs if slots is None or j[0] in slots]
            for j in dropped:
                self._jobs.remove(j)
        for slot, _ in dropped:
            self._done.pop(slot, None)
        return dropped

    def close(self) -> None:
        """Drop queued jobs, let the one in flight finish, join the thread."""
        self.cancel()
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            raise RuntimeError("the expert prefetch thread did not stop")


class ProcessCopier:
    """Copies in a child process into slots in shared memory; ``flat`` (S, expert_numel) is the slot memory."""

    kind = "process"

    def __init__(self, store: ExpertStore, num_slots: int, *, evict: bool):
        if not process_copier_available():
            raise ConfigError("copier='process' needs Linux (os.memfd_create); use copier='thread'")
        self.store, self.evict = store, int(evict)
        nbytes = num_slots * store.expert_bytes
        self._memfd = os.memfd_create("lmlab-expert-slots")
        os.ftruncate(self._memfd, nbytes)
        self._map = mmap.mmap(self._memfd, nbytes)  # shared with the child
        self.flat = torch.frombuffer(self._map, dtype=store.dtype).view(num_slots, store.expert_numel)
        jobs_r, self._jobs_w = os.pipe()
        self._done_r, done_w = os.pipe()
        os.set_blocking(self._done_r, False)
        worker = Path(__file__).with_name("_copy_worker.py")
        fds = (store.fileno(), self._memfd, jobs_r, done_w)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(worker), *map(str, fds), str(store.expert_bytes), str(num_slots)],
                pass_fds=fds, stdin=subprocess.DEVNULL)
        except OSError:
            for fd in (self._jobs_w, self._done_r, self._memfd):
                os.close(fd)
            raise
        finally:
            os.close(jobs_r)
            os.close(done_w)
        self._pending: set[int] = set()
        self._failed: dict[int, int] = {}
        self._tail = b""
        # close() runs this; so does garbage collection of a copier whose engine was never closed
        self._shutdown = weakref.finalize(self, _shutdown_child, self.proc, self._jobs_w, self._done_r, self._memfd)

    def submit(self, jobs: list[tuple[int, tuple[int, int]]]) -> None:
        for slot, _ in jobs:
            self._pending.add(slot)
        msg = b"".join(JOB.pack(slot, self.evict, self.store.spans[key]) for slot, key in jobs)
        try:
            os.write(self._jobs_w, msg)  # < 64 KiB (a pipe's buffer) unless thousands of experts are queued
        except BrokenPipeError:
            self._died()

    def _died(self):
        code = self.proc.poll()
        raise RuntimeError(f"the expert copy process exited (code {code}); close this engine and open a new one")

    def _drain(self, timeout: float) -> None:
        """Collect finished copies; wait up to ``timeout`` seconds for at least one if none is ready."""
        if timeout > 0 and not select.select([self._done_r], [], [], timeout)[0]:
            return
        try:
            data = self._tail + os.read(self._done_r, DONE.size * 1024)
        except BlockingIOError:
            return
        if len(data) == len(self._tail):  # EOF: the child is gone
            self._died()
        n = len(data) // DONE.size
        for slot, status in DONE.iter_unpack(data[:n * DONE.size]):
            self._pending.discard(slot)
            if status:
                self._failed[slot] = status
        self._tail = data[n * DONE.size:]

    def check(self) -> None:
        if self._failed:
            slot, status = self._failed.popitem()
            why = "short read (is the file truncated?)" if status == -1 else os.strerror(status)
            raise DataError(f"expert store {self.store.path}: copying into slot {slot} failed: {why}")

    def pending(self, slot: int) -> bool:
        if slot in self._pending:
            self._drain(0)
        self.check()
        return slot in self._pending

    def wait(self, slot: int) -> bool:
        """Block until ``slot``'s bytes are in (never runs a job itself: returns False). A dead child closes the
        done pipe, which ``_drain`` reads as EOF and reports."""
        while slot in self._pending:
            self._drain(1.0)
        self.check()
        return False

    def cancel(self, slots=None) -> list:
        """Jobs already written to the pipe cannot be taken back (they finish at memory speed): none dropped."""
        return []

    def close(self) -> None:
        """Close the jobs pipe (the child finishes what it has and exits), reap it, release the fds."""
        self._shutdown()
        self._pending.clear()


def _shutdown_child(proc: subprocess.Popen, jobs_w: int, done_r: int, memfd: int) -> None:
    os.close(jobs_w)  # the child reads EOF and exits
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    os.close(done_r)
    os.close(memfd)
