"""Servers the benchmarks start in processes of their own: start, wait until healthy, stop."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from typing import IO, Sequence

from shunter.errors import CLIError


def start_until_healthy(cmd: Sequence[str], port: int, timeout: float, env: dict | None = None,
                        log: IO | int = subprocess.DEVNULL, name: str = "server") -> tuple[subprocess.Popen, float]:
    """Start `cmd` and poll http://127.0.0.1:PORT/health until it answers 200; (process, seconds it took).

    CLIError (the process stopped) if it exits first or is not healthy within `timeout`.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT if log is not subprocess.DEVNULL
                            else subprocess.DEVNULL)
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise CLIError(f"{name} exited with status {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, time.perf_counter() - start
        except OSError:
            time.sleep(0.1)
    stop(proc)
    raise CLIError(f"{name} was not healthy within {timeout:g} s")


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
