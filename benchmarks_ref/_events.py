"""The timing loop of the benchmarks_ref microbenchmarks: the median of CUDA-event times of
``reps`` launches after 3 warm-ups (no L2 flush between them, unlike attnlab's
``bench.timing.median_ms``). Imported by the scripts beside it, run from the repository
root as ``python benchmarks_ref/<script>.py``."""

import torch


def median_event_ms(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]
