"""The offload engine's expert-copy process (standard library only, so it starts in milliseconds: no torch import).

Run by :class:`lmlab.moe.offload.copier.ProcessCopier` as ``python -I -S _copy_worker.py STORE_FD SLOTS_FD JOBS_FD
DONE_FD EXPERT_BYTES NUM_SLOTS``. It maps the engine's slot memory (a shared memfd), reads 16-byte jobs
``(slot, evict, file offset)`` from the jobs pipe and, for each, optionally drops the expert's byte range from the
page cache (``posix_fadvise(DONTNEED)``: the disk tier) and ``preadv``-s it from the expert store straight into the
slot, then writes ``(slot, status)`` to the done pipe: status 0, -1 for a short read (the store was truncated), or
the errno of a failed read. It exits when the engine closes the jobs pipe (or dies: the pipe then reads EOF).

Why a process and not a thread: this process stands in for a GPU's copy engine. A Python thread needs the GIL
between copies, and every hand-off with the decoding thread costs that thread a wake-up (measured: a thread
copier adds ~0.6 ms per token on an 8-block model with no bytes copied at all); a process has its own GIL.
"""

import mmap
import os
import struct
import sys

JOB = struct.Struct("<iiq")  # slot, evict (0/1), byte offset of the expert's span in the store file
DONE = struct.Struct("<ii")  # slot, status


def serve(store_fd: int, slots_fd: int, jobs_fd: int, done_fd: int, expert_bytes: int, num_slots: int) -> None:
    slots = memoryview(mmap.mmap(slots_fd, num_slots * expert_bytes))
    pending = b""
    while True:
        chunk = os.read(jobs_fd, JOB.size * 256)
        if not chunk:  # the engine closed the pipe
            return
        pending += chunk
        n = len(pending) // JOB.size
        for i in range(n):
            slot, evict, offset = JOB.unpack_from(pending, i * JOB.size)
            status = 0
            try:
                if evict:
                    os.posix_fadvise(store_fd, offset, expert_bytes, os.POSIX_FADV_DONTNEED)
                dst = slots[slot * expert_bytes:(slot + 1) * expert_bytes]
                if os.preadv(store_fd, [dst], offset) != expert_bytes:
                    status = -1
            except OSError as e:
                status = e.errno or -2
            os.write(done_fd, DONE.pack(slot, status))  # at once: the engine may be waiting for this one
        pending = pending[n * JOB.size:]


if __name__ == "__main__":
    try:
        serve(*map(int, sys.argv[1:7]))
    except (BrokenPipeError, KeyboardInterrupt):  # the engine went away
        pass
    except Exception as e:  # noqa: BLE001 - one line, not a traceback: the engine reports the exit itself
        sys.stderr.write(f"lmlab expert copy process: {type(e).__name__}: {e}\n")
        sys.exit(1)
