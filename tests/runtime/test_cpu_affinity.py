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


def test_control_cores_without_compute_cores_are_refused():
    with pytest.raises(ValueError, match="control_cpu_affinity needs cpu_affinity"):
        InstanceSpec(control_cpu_affinity=(0,))
    with pytest.raises(ValueError, match=r"control_cpu_affinity.*\(9999,\)"):
        InstanceSpec(cpu_affinity=(0,), control_cpu_affinity=(9999,))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_compute_threads_keep_their_cores_while_the_threads_answering_calls_move_to_others():
    compute, control = sorted(os.sched_getaffinity(0))[:2]
    code = f"""
import os, threading
ready = threading.Event()
early = threading.Thread(target=ready.wait, daemon=True)
early.start()  # a thread that exists before the instance is built (as Ray's do in an actor)
from shunter.runtime.spec import pinned_compute
with pinned_compute(({compute},), ({control},)):
    inside = threading.Thread(target=ready.wait, daemon=True)
    inside.start()  # the engine's loop and torch's threads start here
after = threading.Thread(target=lambda: print(sorted(os.sched_getaffinity(0))))
after.start(); after.join()  # started later by a thread that answers calls
print(sorted(os.sched_getaffinity(inside.native_id)))
print(sorted(os.sched_getaffinity(early.native_id)))
print(sorted(os.sched_getaffinity(0)))
ready.set()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:4] == [f"[{control}]", f"[{compute}]", f"[{control}]", f"[{control}]"]


def test_without_control_cores_everything_stays_on_the_compute_cores():
    core = max(os.sched_getaffinity(0))
    code = f"""
import os, threading
ready = threading.Event()
early = threading.Thread(target=ready.wait, daemon=True)
early.start()
from shunter.runtime.spec import pinned_compute
with pinned_compute(({core},)):
    pass
print(sorted(os.sched_getaffinity(early.native_id)))
print(sorted(os.sched_getaffinity(0)))
ready.set()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == [f"[{core}]"] * 2
