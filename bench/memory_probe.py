"""Memory of the chunk map, measured in a process of its own.

``bench/run.py`` runs this once per scenario, so the peak RSS (``ru_maxrss``,
which never goes down) starts from a clean process. It serves a sparse file
as a device, takes a snapshot, writes through the engine until ``--chunks``
chunks are stored, and prints one JSON object: what the diff area says its
map holds (``map_bytes``, ``chunks_stored``), what Python allocated and kept
(tracemalloc), and how the process grew (VmRSS now, VmHWM/``ru_maxrss`` peak).

Scenarios (all with 4 KiB chunks, so 100k chunks cost 400 MiB of diff
storage rather than 6 GiB; the map holds one int64 per chunk whatever the
chunk size, so bytes per chunk do not depend on it):

``dense``      the first N chunks of the device, written with sequential 1 MiB writes
``random``     N distinct chunks at random on a 64 GiB device (16 Mi chunks,
               as many as a 1 TiB device has at 64 KiB chunks)
``one-per-page``  N chunks, one in each page of the chunk map (the worst case)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import resource
import sys
import tempfile
import time
import tracemalloc

import blksnap
from blksnap.engine.params import Params

CHUNK = 4096
RANDOM_DEVICE = 64 << 30


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak is this run's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def offsets_for(scenario: str, chunks: int, page: int, rng: random.Random) -> tuple[int, list[int]]:
    """(device size, chunk indices to write) for a scenario."""
    if scenario == "dense":
        return chunks * CHUNK, list(range(chunks))
    if scenario == "random":
        size = RANDOM_DEVICE
        return size, rng.sample(range(size // CHUNK), chunks)
    if scenario == "one-per-page":
        return chunks * page * CHUNK, [i * page for i in range(chunks)]
    raise SystemExit(f"unknown scenario {scenario!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", required=True, choices=["dense", "random", "one-per-page"])
    ap.add_argument("--chunks", type=int, required=True)
    ap.add_argument("--tmpdir", default=tempfile.gettempdir())
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--tracemalloc",
        action="store_true",
        help="also count Python allocations (slows every allocation down a lot)",
    )
    args = ap.parse_args()
    logging.getLogger("blksnap").setLevel(logging.ERROR)

    params = Params(chunk_size=CHUNK)
    rng = random.Random(args.seed)
    size, chunks = offsets_for(args.scenario, args.chunks, params.chunk_map_page, rng)
    with tempfile.TemporaryDirectory(dir=args.tmpdir, prefix="blksnap-mem-") as d:
        path = os.path.join(d, "dev")
        with open(path, "wb") as f:
            f.truncate(size)  # sparse: copy-on-write copies holes, nothing to fill
        eng = blksnap.Engine(os.path.join(d, "state"), params)
        try:
            dev = eng.add_device(path, name="mem")
            sid = eng.snapshot_create(["mem"], storage=d, limit=len(chunks) * CHUNK * 2)
            eng.snapshot_take(sid)
            area = eng.snapshot(sid).members["mem"].diff_area
            assert area is not None

            big = os.urandom(1 << 20)
            small = big[:CHUNK]
            gc.collect()
            peak_reset = reset_peak()
            rss0 = rss_kib()
            if args.tracemalloc:
                tracemalloc.start()
            traced0, _ = tracemalloc.get_traced_memory()
            t0 = time.perf_counter()
            if args.scenario == "dense":
                for off in range(0, size, len(big)):
                    dev.write(off, big[: min(len(big), size - off)])
            else:
                for c in chunks:
                    dev.write(c * CHUNK, small)
            seconds = time.perf_counter() - t0
            gc.collect()
            traced1, traced_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            rss1 = rss_kib()
            # ru_maxrss cannot be reset: use it only where VmHWM could not be.
            hwm1 = max(
                rss1,
                rss_kib("VmHWM")
                if peak_reset
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            )
            traced = args.tracemalloc

            result = {
                "scenario": args.scenario,
                "device_size": size,
                "chunk_size": CHUNK,
                "chunk_map_page": params.chunk_map_page,
                "chunks_stored": area.chunks_stored,
                "map_bytes": area.map_bytes,
                "traced_retained": traced1 - traced0 if traced else None,
                "traced_peak": traced_peak - traced0 if traced else None,
                "rss_delta": (rss1 - rss0) * 1024,
                # The peak during the writes, over the RSS before them.
                "peak_rss_delta": (hwm1 - rss0) * 1024,
                "peak_reset": peak_reset,
                "seconds": seconds,
                "state": eng.snapshot(sid).state,
            }
            eng.snapshot_destroy(sid)
            # No flush: the file is thrown away, and fsync of 100k scattered
            # dirty pages would cost more than the whole measurement.
            eng.remove_device("mem")
        finally:
            eng.close()
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
