"""Corpus harvest throughput, and the store's write/read speed relative to plain pyarrow, in one process.

- Harvest: MB of document text per second for the Debian harvester (installed packages: docs, man pages
  rendered by groff) and the wheel harvester (wheels from ``--wheels``: a folder, by default this image's
  local PyPI mirror ``/opt/pypi/files`` when present, else ``pip download --no-deps`` of a fixed list).
- Store: the harvested documents written with :class:`lmlab.corpus.CorpusWriter` (hashing, de-duplication,
  manifest, atomic shards) vs the same rows written with ``pyarrow.parquet.write_table`` (same columns,
  same compression, same shard size); read back as Documents with :class:`lmlab.corpus.Corpus` vs
  ``ParquetFile.iter_batches().to_pylist()``. Rounds alternate (plain, ours, plain, ours...) and medians
  are compared. Ours does more per row (normalised-text hash for de-duplication, per-class/source/group
  counts, shard checksums and fsync, a manifest rewrite per shard; parsing ``meta`` JSON on read), so
  the ratios price those guarantees. Writes ``--out`` (default results/bench_corpus.json).

    python benchmarks/corpus.py [--max-packages 80 --max-wheels 40 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lmlab.corpus import Corpus, CorpusWriter, StoreConfig
from lmlab.corpus.document import text_hash
from lmlab.corpus.harvest.debian import DebianConfig, DebianHarvester, installed_packages
from lmlab.corpus.harvest.wheels import WheelHarvester
from lmlab.corpus.store import COLUMNS, schema
from lmlab.io import write_json_atomic

MB = 1e6
FALLBACK_WHEELS = ["click", "rich", "requests", "python-debian", "pyyaml", "jinja2", "markupsafe", "packaging"]


def harvest(harvesters) -> tuple[list, float]:
    t0 = time.perf_counter()
    docs = [d for h in harvesters for d in h.documents()]
    return docs, time.perf_counter() - t0


def wheel_paths(folder: str | None, limit: int, tmp: Path) -> list[Path]:
    if folder is None and Path("/opt/pypi/files").is_dir():
        folder = "/opt/pypi/files"
    if folder is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(tmp),
                        *FALLBACK_WHEELS], check=True)
        folder = str(tmp)
    small = sorted(p for p in Path(folder).iterdir() if p.name.endswith(".whl") and p.stat().st_size < 4_000_000)
    return small[:limit]


def write_ours(docs, folder: Path, shard_mb: float) -> None:
    with CorpusWriter(folder, config=StoreConfig(shard_mb=shard_mb, min_chars=0)) as w:
        for d in docs:
            w.add(d)


def write_plain(rows: dict[str, list[str]], folder: Path, shard_rows: list[tuple[int, int]]) -> None:
    folder.mkdir(parents=True)
    for i, (a, b) in enumerate(shard_rows):
        table = pa.Table.from_pydict({c: v[a:b] for c, v in rows.items()}, schema=schema())
        pq.write_table(table, folder / f"part-{i:05d}.parquet", compression="zstd")


def read_ours(folder: Path) -> int:
    return sum(len(d.text) for d in Corpus(folder).documents())


def read_plain(folder: Path) -> int:
    n = 0
    for path in sorted(folder.glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            n += sum(len(r["text"]) for r in batch.to_pylist())
    return n


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-packages", type=int, default=80, help="installed Debian packages to harvest (by name)")
    ap.add_argument("--wheels", default=None, help="folder of wheels (default: /opt/pypi/files or pip download)")
    ap.add_argument("--max-wheels", type=int, default=40)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel man-page renderers")
    ap.add_argument("--shard-mb", type=float, default=16.0)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of each store operation, alternating")
    ap.add_argument("--out", default="results/bench_corpus.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp_str:
        tmp = Path(tmp_str)
        names = [p.name for p in installed_packages(Path("/")) if not p.name.startswith("google-cloud-cli")]
        chosen = tuple(names[: args.max_packages])
        debian_docs, debian_s = harvest([DebianHarvester(DebianConfig(packages=chosen, workers=args.workers))])
        wheels = wheel_paths(args.wheels, args.max_wheels, tmp / "wheels")
        wheel_docs, wheel_s = harvest([WheelHarvester(p) for p in wheels])
        debian_mb = sum(d.n_bytes for d in debian_docs) / MB
        wheel_mb = sum(d.n_bytes for d in wheel_docs) / MB

        docs = debian_docs + wheel_docs
        rows: dict[str, list[str]] = {c: [] for c in COLUMNS}
        for d in docs:
            values = (d.id, d.text, d.source, d.license, d.license_class, d.group, d.origin,
                      json.dumps(d.meta, sort_keys=True), text_hash(d.text))
            for c, v in zip(COLUMNS, values, strict=True):
                rows[c].append(v)
        shard_rows, start, size = [], 0, 0
        for i, d in enumerate(docs):  # the same shard boundaries as CorpusWriter's
            size += d.n_bytes
            if size >= args.shard_mb * MB:
                shard_rows.append((start, i + 1))
                start, size = i + 1, 0
        if start < len(docs):
            shard_rows.append((start, len(docs)))

        times: dict[str, list[float]] = {"write_plain": [], "write_ours": [], "read_plain": [], "read_ours": []}
        for r in range(args.repeats + 1):  # round 0 warms caches and is not counted
            plain, ours = tmp / f"plain{r}", tmp / f"ours{r}"
            t = {"write_plain": timed(lambda p=plain: write_plain(rows, p, shard_rows)),
                 "write_ours": timed(lambda o=ours: write_ours(docs, o, args.shard_mb)),
                 "read_plain": timed(lambda p=plain: read_plain(p)),
                 "read_ours": timed(lambda o=ours: read_ours(o))}
            if r:
                for k, v in t.items():
                    times[k].append(v)
            shutil.rmtree(plain)
            shutil.rmtree(ours)
        med = {k: statistics.median(v) for k, v in times.items()}

    total_mb = debian_mb + wheel_mb
    result = {
        "benchmark": "corpus",
        "config": vars(args),
        "environment": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                        "pyarrow": pa.__version__},
        "harvest": {
            "debian": {"packages": len(chosen), "documents": len(debian_docs), "mb": round(debian_mb, 2),
                       "seconds": round(debian_s, 2), "mb_per_s": round(debian_mb / debian_s, 2)},
            "wheels": {"archives": len(wheels), "documents": len(wheel_docs), "mb": round(wheel_mb, 2),
                       "seconds": round(wheel_s, 2), "mb_per_s": round(wheel_mb / wheel_s, 2)},
        },
        "store": {
            "documents": len(docs), "mb": round(total_mb, 2),
            "seconds_median": {k: round(v, 3) for k, v in med.items()},
            "write_mb_per_s": {"ours": round(total_mb / med["write_ours"], 1),
                               "plain_pyarrow": round(total_mb / med["write_plain"], 1)},
            "read_mb_per_s": {"ours": round(total_mb / med["read_ours"], 1),
                              "plain_pyarrow": round(total_mb / med["read_plain"], 1)},
            # throughput of ours relative to plain pyarrow (1.0 = as fast; below 1 = slower)
            "write_ratio": round(med["write_plain"] / med["write_ours"], 3),
            "read_ratio": round(med["read_plain"] / med["read_ours"], 3),
        },
    }
    h, s = result["harvest"], result["store"]
    result["summary"] = {
        "claim": "`lmlab.corpus` harvest throughput; store write/read vs plain pyarrow on the same rows (issue 3)",
        "paper": "no target: issue 3 asks for the numbers",
        "ours": f"debian {h['debian']['mb_per_s']} MB/s, wheels {h['wheels']['mb_per_s']} MB/s; store write "
                f"{s['write_ratio']}x, read {s['read_ratio']}x plain pyarrow ({s['mb']} MB, {s['documents']} docs)",
        "command": "`python benchmarks/corpus.py`",
        "reproduced": "measured",
    }
    print(f"debian harvest: {h['debian']['mb']} MB from {h['debian']['packages']} packages in "
          f"{h['debian']['seconds']} s = {h['debian']['mb_per_s']} MB/s")
    print(f"wheel harvest:  {h['wheels']['mb']} MB from {h['wheels']['archives']} wheels in "
          f"{h['wheels']['seconds']} s = {h['wheels']['mb_per_s']} MB/s")
    print(f"store write: ours {s['write_mb_per_s']['ours']} MB/s, plain pyarrow {s['write_mb_per_s']['plain_pyarrow']} "
          f"MB/s, ratio {s['write_ratio']}")
    print(f"store read:  ours {s['read_mb_per_s']['ours']} MB/s, plain pyarrow {s['read_mb_per_s']['plain_pyarrow']} "
          f"MB/s, ratio {s['read_ratio']}")
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
