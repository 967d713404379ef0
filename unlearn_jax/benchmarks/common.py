"""What the benchmarks share: cores and subprocess environments, compile time, peak memory,
timed loops and Markdown tables."""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path

COMPILE_EVENT_PREFIX = "/jax/core/compile/"  # trace, lower-to-MLIR and XLA compile durations


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name, so that every result names the machine it came from.

    Linux's /proc/cpuinfo 'model name' (`cpuinfo`: that file's text, for tests),
    else `platform.processor()`, else 'unknown'. CPU speed ratios between the two
    frameworks differ from one CPU to another (see the README's speed section, and
    docs/speed.md, "On a second machine").
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or "unknown"


def subprocess_env(compilation_cache: Path | None = None) -> dict:
    """The subprocesses' environment: cold compiles (as a new user sees them) by default."""
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    # The CLI keeps a persistent cache (~/.cache/unlearn_jax/xla) that would make
    # the "cold" process warm; off, or a given folder for the warm measurement.
    env["UNLEARN_JAX_COMPILATION_CACHE"] = str(compilation_cache) if compilation_cache else "off"
    env["TQDM_DISABLE"] = "1"
    return env


def children_cpu_s() -> float:
    """User + system CPU seconds of all waited-for child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def jax_compile_seconds(fn) -> tuple[object, float]:
    """(fn(), seconds JAX spent tracing, lowering and compiling while it ran)."""
    result, by_program = jax_compile_seconds_by_program(fn)
    return result, sum(by_program.values())


def jax_compile_seconds_by_program(fn) -> tuple[object, dict[str, float]]:
    """(fn(), {jitted function's name: trace + lower + compile seconds} while it ran)."""
    import jax.monitoring

    spent: dict[str, float] = {}

    def listener(event: str, duration: float, **kwargs) -> None:
        if event.startswith(COMPILE_EVENT_PREFIX):
            name = str(kwargs.get("fun_name") or "other")
            if name.startswith("jit(") and name.endswith(")"):  # XLA's compile event
                name = name[4:-1]  # one entry per program with its trace and lowering
            spent[name] = spent.get(name, 0.0) + duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return result, spent


def max_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """`getrusage(who).ru_maxrss` in MiB: this process's peak RSS, or with RUSAGE_CHILDREN
    the largest of any waited-for child process so far."""
    peak = resource.getrusage(who).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # Linux: KiB; macOS: bytes


def exit_reason(returncode: int, peak_rss_mb: float | None = None) -> str:
    """Why a worker process ended, for its error: its exit status, or the signal that
    killed it. A SIGKILL nobody sent is, on Linux, the kernel's out-of-memory killer
    (the process then writes nothing to stderr), so that one says so, with the peak RSS."""
    import signal

    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if -returncode != signal.SIGKILL:
        return f"killed by {name}"
    peak = ""
    if peak_rss_mb:
        size = f"{peak_rss_mb / 1024:.1f} GiB" if peak_rss_mb >= 1024 else f"{peak_rss_mb:.0f} MiB"
        peak = f"; the largest worker so far peaked at {size} RSS"
    return (
        f"killed by {name}, most likely by the out-of-memory killer{peak}. Fix: a smaller "
        "batch or model, or a machine with more memory"
    )


def run_worker(
    module: str, name: str, workdir: Path, env: dict | None = None, timeout: float | None = None
) -> dict:
    """`python -m MODULE --worker NAME --workdir DIR` in a fresh process: its last stdout
    line parsed as JSON, plus its wall and CPU seconds. Each framework in its own process
    keeps its peak memory (host and device) its own.

    timeout: seconds; a worker still running then is killed, and the RuntimeError says
    so (with the end of its stderr so far). None waits as long as it takes.
    """
    import json
    import subprocess

    command = [sys.executable, "-m", module, "--worker", name, "--workdir", str(workdir)]
    start, cpu = time.perf_counter(), children_cpu_s()
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, env=env or subprocess_env(), timeout=timeout
        )
    except subprocess.TimeoutExpired as e:  # run() has killed and reaped it
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        said = f":\n{stderr[-3000:]}" if stderr else " (it wrote nothing to stderr)"
        raise RuntimeError(
            f"the {name} worker did not finish in {timeout:.0f} s and was killed{said}"
        ) from None
    if proc.returncode:
        reason = exit_reason(proc.returncode, max_rss_mb(resource.RUSAGE_CHILDREN))
        raise RuntimeError(f"the {name} worker failed ({reason}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - start
    result["process_cpu_s"] = children_cpu_s() - cpu
    return result


def serve_worker(workdir: Path, run, ours: bool = False) -> dict:
    """The worker's side of `run_worker`: `run(spec, workdir)` with the spec the parent
    wrote to workdir/spec.json; its result printed as the last stdout line (JSON).

    ours: the worker times our side, so Python's collector runs as in the `unlearn-jax`
    program (`cli.collect_less`).
    """
    import json

    if ours:
        from unlearn_jax.cli import collect_less

        collect_less()
    spec = json.loads((workdir / "spec.json").read_text())
    result = run(spec, workdir)
    print(json.dumps(result))
    return result


def proc_status_mb(field: str) -> float | None:
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
    def peak_mb() -> float:
        peak = proc_status_mb("VmHWM")
        return peak if peak is not None else max_rss_mb()

    def mark(self) -> None:
        self.before_mark = self.peak_mb()
        self.base = proc_status_mb("VmRSS") or self.before_mark
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        except OSError:
            pass

    def report(self) -> dict[str, float]:
        """{'peak_rss_mb', 'rss_after_imports_mb', 'rss_growth_mb' (peak since mark - base)}."""
        since = self.peak_mb()
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


def markdown_rows(header: list[str], rows: list[list]) -> list[str]:
    """Markdown table lines; floats with 2 decimals, None as an empty cell."""
    cell = lambda x: "" if x is None else (f"{x:.2f}" if isinstance(x, float) else str(x))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
