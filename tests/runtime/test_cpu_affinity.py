"""Instances pinned to their own cores: the spec checks the cores, and every thread of the process follows."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shunter.runtime.spec import InstanceSpec


def test_cores_outside_the_machine_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"cpu_affinity.*\(9999,\)"):
        InstanceSpec(cpu_affinity=(9999,))
    with pytest.raises(ValueError, match="cpu_affinity"):
        InstanceSpec(cpu_affinity=())
    assert InstanceSpec(cpu_affinity=(0,)).cpu_affinity == (0,)


def test_pinning_moves_every_thread_and_the_threads_started_later():
    core = max(os.sched_getaffinity(0))
    code = f"""
import os, threading
ready = threading.Event()
early = threading.Thread(target=ready.wait, daemon=True)
early.start()  # a thread that exists before the pinning (as Ray's do in an actor)
from shunter.runtime.spec import pin_process
pin_process(({core},))
late = threading.Thread(target=lambda: print(sorted(os.sched_getaffinity(0))))
late.start(); late.join()
print(sorted(os.sched_getaffinity(early.native_id)))
print(sorted(os.sched_getaffinity(0)))
ready.set()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:3] == [f"[{core}]"] * 3
