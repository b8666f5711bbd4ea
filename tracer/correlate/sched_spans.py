"""Scheduler and memory attributes for the spans of one exact capture (`--sched`).

The capture program, compiled with bpf/sched.c (`WITH_SCHED`), snapshots the span's thread
with `sched_read()` in its entry and exit handlers; the engine decodes each snapshot into
`RawEvent.sched`. `SchedSpans` holds the RSS samples the kernel emits between snapshots
and turns an (entry, exit) pair into the span's `ophamin.*` attributes, for the
assembler's `sched_attrs` hook. Its counters say what the kernel did not report.
"""

from __future__ import annotations

import bisect
import ctypes
from typing import Any, Dict, Iterable, List

from .sched import (
    A_RSS_END,
    A_RSS_PEAK,
    A_RSS_START,
    RssSample,
    RssSampleC,
    ThreadSnapshot,
    program_misses,
    read_health,
    read_rss_state,
    span_sched,
)


class SchedSpans:
    """RSS samples of one traced process plus the span-attribute hook. `bpf` is the capture
    program (bcc BPF object) that includes sched.c, already seeded (`seed_rss`)."""

    def __init__(self, bpf: Any) -> None:
        self.bpf = bpf
        self._ts: List[int] = []  # sample timestamps, ascending
        self._samples: List[RssSample] = []
        self.cross_thread = 0  # spans that ended on another thread than they began on
        bpf[b"rss_samples"].open_ring_buffer(self._on_rss)

    def _on_rss(self, _ctx: Any, data: Any, _size: int) -> int:
        c = ctypes.cast(data, ctypes.POINTER(RssSampleC)).contents
        s = RssSample(ts=c.ts, total=c.total, file=c.file, anon=c.anon, shmem=c.shmem)
        # Samples come from every CPU: keep them ordered for the window lookups.
        i = bisect.bisect_right(self._ts, s.ts)
        self._ts.insert(i, s.ts)
        self._samples.insert(i, s)
        return 0

    def samples_between(self, t0: int, t1: int) -> List[RssSample]:
        return self._samples[bisect.bisect_left(self._ts, t0): bisect.bisect_right(self._ts, t1)]

    def attributes(self, open_span: Any, exit_event: Any) -> Dict[str, Any]:
        """The assembler's hook: `open_span.sched0` and `exit_event.sched` are the decoded
        entry and exit snapshots (`struct sched_acct` field dicts)."""
        entry = ThreadSnapshot.from_dict(open_span.tid, open_span.sched0)
        exit = ThreadSnapshot.from_dict(exit_event.tid, exit_event.sched)
        if entry.ts > exit.ts:
            return {}
        samples = self.samples_between(entry.ts, exit.ts)
        if entry.tid != exit.tid:
            # A generator or coroutine resumed on another thread: two threads' counters do
            # not subtract. The process's memory still does.
            self.cross_thread += 1
            peak = max([entry.rss_bytes, exit.rss_bytes] + [s.total for s in samples])
            return {A_RSS_START: entry.rss_bytes, A_RSS_END: exit.rss_bytes, A_RSS_PEAK: peak}
        return span_sched(entry, exit, samples).attributes()

    def prune(self, open_spans: Iterable[Any]) -> None:
        """Forget samples older than every open span's entry snapshot."""
        starts = [o.sched0["last_ts"] for o in open_spans if o.sched0]
        horizon = min(starts) if starts else (self._ts[-1] if self._ts else 0)
        cut = bisect.bisect_left(self._ts, horizon)
        if cut:
            del self._ts[:cut]
            del self._samples[:cut]

    def counters(self) -> Dict[str, int]:
        """What the kernel did not report, for the capture's counters (all start `sched_`)."""
        out = {f"sched_{k}": v for k, v in read_health(self.bpf).items()}
        for tp, n in program_misses(self.bpf).items():
            out[f"sched_skipped_{tp}"] = n
        rss = read_rss_state(self.bpf)
        out["sched_rss_events"] = rss.events
        out["sched_rss_samples_dropped"] = rss.dropped
        out["sched_cross_thread_spans"] = self.cross_thread
        return out
