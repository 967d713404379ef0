"""Process-level measurements shared by the benchmark workers: peak RSS, pinning, timing."""

from __future__ import annotations

import os
import resource
import sys
import time


def _proc_status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status ('VmRSS', 'VmHWM') in MiB; None where there is none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """This process's peak RSS, in total and since `mark()` (e.g. after the imports).

    Linux: VmHWM, reset at `mark()` through /proc/self/clear_refs. Not
    `getrusage`'s ru_maxrss: across fork + exec it keeps the parent's high-water
    mark, so a child of a large parent reports the parent's peak. Elsewhere
    ru_maxrss is the fallback (growth is then a getrusage delta, 0 when the
    peak came before `mark()`).
    """

    def __init__(self):
        self.before_mark = self.base = 0.0

    @staticmethod
    def high_water_mb() -> float:
        """The process's peak RSS so far in MiB (since the last `mark()` on Linux)."""
        peak = _proc_status_mb("VmHWM")
        if peak is not None:
            return peak
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib / 1024 if sys.platform != "darwin" else kib / 2**20  # macOS: bytes

    def mark(self) -> None:
        self.before_mark = self.high_water_mb()
        self.base = _proc_status_mb("VmRSS") or self.before_mark
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        except OSError:
            pass

    def report(self) -> dict[str, float]:
        """{'peak_rss_mb', 'rss_after_imports_mb', 'rss_growth_mb' (peak since mark - base)}."""
        since = self.high_water_mb()
        return {
            "peak_rss_mb": max(self.before_mark, since),
            "rss_after_imports_mb": self.base,
            "rss_growth_mb": max(since - self.base, 0.0),
        }


def pin_threads(threads: int) -> None:
    """Restricts this process to `threads` cores; call before JAX or torch start threads."""
    if threads and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def timed_loop(step, warmup: int, steps: int, sync) -> dict:
    """Runs `step()` warmup + steps times; wall and CPU seconds of the last `steps`."""
    for _ in range(warmup):
        step()
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "steps_per_s": steps / wall}
