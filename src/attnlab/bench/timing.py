"""What every benchmark shares: median timing, peak memory, the environment record and
the one table writer.

Needs only torch (pyarrow for Parquet), so the kernel benchmark runs on a GPU image
without the rest of the pipeline.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch


def median_ms(
    fn, device: str, rep_ms: float, min_reps: int, max_reps: int = 100
) -> tuple[float, int]:
    """Median wall time of fn() in ms and its repetitions (:func:`median_ms_rounds` of fn
    alone)."""
    return median_ms_rounds([fn], device, rep_ms, min_reps, max_reps)[0]


def median_ms_rounds(
    fns, device: str, rep_ms: float, min_reps: int, max_reps: int = 100
) -> list[tuple[float, int]]:
    """Median wall time in ms of each of ``fns`` and its repetitions, timed in rounds
    (each round runs every fn once, in order), so that a slower stretch of the machine
    (another tenant, a host stall) falls on all of them alike and their ratios hold; after
    two warm-up calls of each (compilation included there), as many rounds as ``rep_ms``
    per fn allows, between ``min_reps`` and ``max_reps``.

    On CUDA each run is bracketed by events and preceded by a write of 256 MiB so that no
    run finds its inputs in L2 from the one before.
    """
    cuda = device == "cuda"
    for fn in fns:
        for _ in range(2):
            fn()
    flush = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda") if cuda else None

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    for fn in fns:
        fn()
    sync()
    estimate = (time.perf_counter() - t0) * 1e3 / len(fns)
    reps = max(min_reps, min(max_reps, int(rep_ms / max(estimate, 1e-3))))
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, got in zip(fns, times, strict=True):
            if cuda:
                flush.zero_()
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                got.append((start, end))
            else:
                t0 = time.perf_counter()
                fn()
                got.append((time.perf_counter() - t0) * 1e3)
    sync()
    if cuda:
        times = [[s.elapsed_time(e) for s, e in got] for got in times]
    return [(statistics.median(got), reps) for got in times]


def return_freed_memory() -> bool:
    """Make glibc serve every allocation of 64 KiB or more by mmap and give it back when
    freed, so that the resident set follows the live tensors instead of the allocator's
    high-water mark. Returns whether it could."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 16) and libc.mallopt(m_trim_threshold, 1 << 16))


class PeakMemory:
    """Peak memory above the level at entry, in MiB: CUDA allocations, or the resident set
    of this process sampled by a thread (torch releases the GIL while it computes)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self._rss()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, self._rss() - self.base)
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self.base)

    @property
    def mib(self) -> float:
        return self.peak / 2**20


def environment() -> dict:
    """Where a benchmark ran: torch, Python, host, Triton, GPU and date, one column each."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = ""
    env["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    env["date"] = time.strftime("%Y-%m-%d")
    return env


def write_table(rows: list[dict], out_dir: Path, name: str, meta: dict) -> list[Path]:
    """Write rows (plus the meta columns) atomically as ``<name>.csv``, and as
    ``<name>.parquet`` when pyarrow imports; returns the paths written, Parquet last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{**row, **meta} for row in rows]
    written = []
    tmp = out_dir / f".{name}.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out_dir / f"{name}.csv")
    written.append(out_dir / f"{name}.csv")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    tmp = out_dir / f".{name}.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rows), tmp, compression="zstd")
    tmp.replace(out_dir / f"{name}.parquet")
    written.append(out_dir / f"{name}.parquet")
    return written
