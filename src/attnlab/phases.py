"""Where a prefill's time goes: the policy's selection, the attention kernels and the rest
of the model (``attnlab bench prefill``'s ``selection_ms``, ``attention_ms`` and
``rest_ms``, from one pass beside the timed ones), and how long the host took to issue the
pass (``host_ms``: on the GPU, well below the pass's own time where the host ran ahead;
near it where the GPU waited for the host, or where a host far ahead blocked on a full
launch queue: an upper bound of the host's share).

The attention marks its two phases with :func:`phase`, which costs nothing unless a
:class:`Phases` is active. Then each phase is bracketed by CUDA events on the GPU (recorded
in the stream: no wait inside the pass) or read from the host clock on the CPU (where the
kernels run synchronously), and the spans are summed after the pass. Phases do not nest.
"""

from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager

import torch

_ACTIVE: contextvars.ContextVar[Phases | None] = contextvars.ContextVar("phases", default=None)


@contextmanager
def phase(name: str):
    """Count the enclosed work as phase ``name`` (``selection``, ``attention``) of the
    active :class:`Phases`, if any."""
    timer = _ACTIVE.get()
    if timer is None:
        yield
        return
    if timer.open is not None:
        raise RuntimeError(f"phase {name!r} inside phase {timer.open!r}: phases do not nest")
    timer.open, start = name, timer.mark()
    try:
        yield
    finally:
        timer.spans.setdefault(name, []).append((start, timer.mark()))
        timer.open = None


class Phases:
    """A pass's phases, while active (``with Phases(device) as phases:``); :meth:`ms`
    after it."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.spans: dict[str, list] = {}
        self.open: str | None = None

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __enter__(self) -> Phases:
        if self.cuda:  # the pass starts on an idle GPU, its first event with the host clock
            torch.cuda.synchronize()
        self._token = _ACTIVE.set(self)
        self._host_start = time.perf_counter()
        self._start = self.mark()
        return self

    def __exit__(self, *exc) -> None:
        self._end = self.mark()
        self._host_end = time.perf_counter()
        _ACTIVE.reset(self._token)

    def _elapsed(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def ms(self) -> dict[str, float]:
        """Milliseconds of each phase (``selection``, ``attention``; 0 where it never ran),
        of the whole pass (``total``), of the rest of it (``rest``) and of the host's
        issuing it (``host``, from the ``with`` to its end)."""
        names = ("selection", "attention")
        if self.cuda:
            torch.cuda.synchronize()
        out = {n: sum(self._elapsed(a, b) for a, b in self.spans.get(n, [])) for n in names}
        out["total"] = self._elapsed(self._start, self._end)
        out["rest"] = out["total"] - sum(out[n] for n in names)
        out["host"] = (self._host_end - self._host_start) * 1e3
        return out
