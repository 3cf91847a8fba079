"""Which channel a live migration's KV copy takes between two Ray-actor instances."""

from __future__ import annotations

from shunter.model.shared_kv import KVShare
from shunter.runtime.handles import LocalInstance
from shunter.runtime.ray_instance import RayInstance, kv_channel
from shunter.runtime.spec import InstanceSpec


def ray_instance(instance_id: str, host: str, shared: bool, channel: str = "shared-memory") -> RayInstance:
    """A RayInstance as `start` leaves it (no actor needed to decide a channel)."""
    inst = RayInstance(instance_id, InstanceSpec(kv_channel=channel))
    inst.facts = {"host": host, "executor": "model"}
    inst.kv_share = KVShare(host, 1234, 7, (30, 64, 16, 6, 64), "bfloat16") if shared else None
    return inst


def test_one_machine_and_a_shared_cache_read_directly():
    assert kv_channel(ray_instance("0", "a", True), ray_instance("1", "a", True)) == "shared-memory"
    # The destination's own cache need not be shared: only the source's is read.
    assert kv_channel(ray_instance("0", "a", True), ray_instance("1", "a", False)) == "shared-memory"


def test_everything_else_goes_through_the_object_store():
    assert kv_channel(ray_instance("0", "a", True), ray_instance("1", "b", True)) == "object-store"  # two machines
    assert kv_channel(ray_instance("0", "a", False), ray_instance("1", "a", True)) == "object-store"  # private cache
    assert kv_channel(ray_instance("0", "a", True), ray_instance("1", "a", True, "object-store")) == "object-store"
    local = LocalInstance("1", InstanceSpec(executor="null"))
    assert kv_channel(ray_instance("0", "a", True), local) == "object-store"


def test_a_torch_distributed_destination_takes_the_blocks_over_gloo_between_two_model_instances():
    gloo = "torch-distributed"
    assert kv_channel(ray_instance("0", "a", False, gloo), ray_instance("1", "b", False, gloo)) == gloo
    # Chosen by the destination, as the other channels are; from a shared cache too.
    assert kv_channel(ray_instance("0", "a", True), ray_instance("1", "a", False, gloo)) == gloo
    assert kv_channel(ray_instance("0", "a", False, gloo), ray_instance("1", "a", True)) == "object-store"
    null = ray_instance("1", "a", False, gloo)
    null.facts["executor"] = "null"  # no KV to send
    assert kv_channel(ray_instance("0", "a", False, gloo), null) == "object-store"


def test_background_copies_yield_the_cpu_and_a_final_stage_copy_does_not():
    import os
    import threading

    from shunter.runtime.ray_instance import COPY_THREAD_NICE, _copy_priority

    def nice_after(background: bool) -> int:
        seen = []

        def copy() -> None:  # a copy thread of its own, as each concurrency group has
            _copy_priority(background)
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

        thread = threading.Thread(target=copy)
        thread.start()
        thread.join()
        return seen[0]

    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert nice_after(False) == base
    assert nice_after(True) == max(base, COPY_THREAD_NICE)


def test_a_gloo_link_whose_copy_failed_is_replaced_once_for_the_pair():
    from shunter.runtime.ray_instance import _break, _link

    first = _link("9", "8")
    assert first == (("8", "9"), first[1]) and _link("8", "9") == first  # either direction
    _break(first)
    second = _link("8", "9")
    assert second == (("8", "9"), first[1] + 1)
    _break(first)  # a second failure on the old link (a copy in flight beside it): nothing more moves
    assert _link("8", "9") == second
