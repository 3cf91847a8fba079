"""The machine a measurement runs on: its CPU, and how much other processes take of it.

Linux only where it reads /proc; elsewhere each reading is None ("unknown")
and the measurement goes on without the guard.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def runqueue_wait_seconds(task_dir: str | Path = "/proc/self/task") -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU, or None where unknown.

    Linux schedstat: `task_dir/<tid>/schedstat` holds "<ns on a CPU> <ns
    waiting for one> <timeslices>"; the second fields are summed over the
    threads. A thread whose file cannot be read or parsed is skipped (it may
    have just ended); None if `task_dir` cannot be listed (not Linux) or no
    thread's file could be read. A step whose threads waited for a CPU was
    slowed by other processes: with torch's OpenMP threads on every core, one
    descheduled thread stalls all of them at the next barrier, so a single
    busy neighbour can make a step 5-15x slower.
    """
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return None
    total = 0
    num_read = 0
    for tid in tids:
        try:
            with open(os.path.join(task_dir, tid, "schedstat")) as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        num_read += 1
    return total / 1e9 if num_read else None


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU time used so far by the whole machine and by this process, at a moment."""

    machine_busy: float
    own: float
    time: float

    @classmethod
    def take(cls) -> CpuSnapshot | None:
        """None where /proc/stat cannot be read (not Linux)."""
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait (steal counts: others ran)
        return cls(busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic())

    def others_since(self, earlier: CpuSnapshot) -> float:
        """CPUs' worth of work other processes did between `earlier` and this snapshot."""
        span = self.time - earlier.time
        if span <= 0:
            return 0.0
        return max(0.0, (self.machine_busy - earlier.machine_busy) - (self.own - earlier.own)) / span


def wait_until_idle(max_wait: float, *, threshold: float = 0.2, window: float = 2.0,
                    report: Callable[[str], None] = print) -> float | None:
    """Wait (up to `max_wait` s) until other processes use less than `threshold` CPUs over `window` s.

    Returns the CPUs they used over the last window (None where unknown).
    """
    deadline = time.monotonic() + max_wait
    reported = False
    while True:
        before = CpuSnapshot.take()
        if before is None:
            return None
        time.sleep(window)
        others = CpuSnapshot.take().others_since(before)
        if others < threshold or time.monotonic() >= deadline:
            return others
        if not reported:
            report(f"other processes use {others:.1f} CPUs; waiting up to {max_wait:.0f} s for the machine to be idle")
            reported = True


def default_threads() -> int:
    """The CPUs this process may run on (torch's thread count for a measurement)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1



def cpu_name() -> str:
    """The CPU's model name ("unknown" where the system does not say)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"



def load_average() -> float | None:
    """The one-minute load average, or None where the system has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None

