"""Instances as Ray actors: each one its own process, its engine loop a thread inside it.

Live migration's engine calls and KV copies are actor calls too. A copy takes
one of three channels (`kv_channel`): between two instances on one machine whose
caches are in shared memory, the destination reads the blocks straight from the
source's cache (shunter/model/shared_kv.py), so the source spends nothing on
it; with `--kv-channel torch-distributed` the source reads the blocks and sends
them to the destination over a gloo link between the two processes
(shunter/runtime/torch_channel.py); otherwise the source reads the blocks and
the payload goes to the destination through Ray's object store (Ray's transfer
across machines). `shunter bench migration` measures all three. Copies run in
concurrency groups of their own, beside the engine's steps rather than between them (copy_safe in
handles.py says why that is safe), so they never stall the step loop: the
background stages' copies at a low CPU priority, the final stage's (the
request waits on it) at the normal one.

The actor has two concurrency groups: commands (add, abort, finish) run one at
a time in the order the frontend sent them, so an abort can never overtake the
add it cancels; `poll` runs in its own group, so a poll waiting for the next
step never holds a command up. Ray starts, places and connects the processes;
there is no process manager or RPC layer of Shunter's own.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading

from shunter.request import Request
from shunter.runtime.engine_loop import EngineLoop, StepMessage
from shunter.runtime.handles import CopyTimedOut, InstanceHandle, InstanceState
from shunter.runtime.spec import InstanceSpec, build_engine, pinned_compute


class InstanceWorker:
    """The actor's body: builds the engine where it runs and drives it with an `EngineLoop`."""

    def __init__(self, instance_id: str, spec: InstanceSpec) -> None:
        # The engine's threads (torch's, the loop's) start inside the block, on the compute cores;
        # Ray's threads, which answer calls, move to the control cores after it, when the spec names them.
        with pinned_compute(spec.cpu_affinity, spec.control_cpu_affinity):
            engine, self.facts = build_engine(spec, instance_id)
            self.facts["cpus"] = sorted(os.sched_getaffinity(0))
            self.config = engine.config
            self.loop = EngineLoop(engine, spec.report_interval, record_steps=spec.record_steps)
            self.loop.start()
        self.executor = engine.executor
        self.kv_share = getattr(self.executor, "kv_share", None)  # the null executor has no cache to share
        self.facts["host"] = os.uname().nodename
        self.facts["control_cpus"] = sorted(os.sched_getaffinity(0))
        self.facts["kv_cache"] = "private" if self.kv_share is None else "shared-memory"
        self.facts["kv_channel"] = spec.kv_channel
        self.instance_id = instance_id
        self.kv_links = None  # this instance's gloo links, from its first torch-distributed copy on
        self._kv_links_lock = threading.Lock()

    def info(self) -> dict:
        return {"config": self.config, "facts": self.facts, "report": self.loop.load_report().result(),
                "kv_share": self.kv_share}

    def add_request(self, request: Request) -> None:
        self.loop.add_request(request)

    def resume_request(self, state) -> None:
        self.loop.resume_request(state)

    def abort_request(self, request_id: str) -> None:
        self.loop.abort_request(request_id)

    def finish_request(self, request_id: str) -> None:
        self.loop.finish_request(request_id)

    def poll(self, after_seq: int, timeout: float) -> list[StepMessage]:
        return self.loop.poll(after_seq, timeout)

    def engine_call(self, name: str, *args):
        return self.loop.engine_call(name, *args).result()

    def read_blocks(self, block_ids: list[int], background: bool = True):
        """These blocks' KV, all layers, read at once, beside a running step (see `copy_safe`)."""
        _copy_priority(background)
        return self.executor.read_blocks(block_ids)

    def write_blocks(self, block_ids: list[int], payload, background: bool = True) -> None:
        """Store a `read_blocks` payload of another instance into reserved `block_ids`, beside a running step."""
        _copy_priority(background)
        self.executor.write_blocks(block_ids, payload)

    def pull_blocks(self, share, src_block_ids: list[int], block_ids: list[int],
                    max_bytes_per_s: float | None = None, background: bool = True) -> None:
        """Copy blocks of another instance's shared cache on this machine into reserved `block_ids`."""
        _copy_priority(background)
        self.executor.pull_blocks(share, src_block_ids, block_ids, max_bytes_per_s)

    def kv_link_address(self) -> str:
        """Where this instance's torch-distributed links meet ("host:port"); it listens from the first call on."""
        with self._kv_links_lock:
            if self.kv_links is None:
                import ray

                from shunter.runtime.torch_channel import KVLinks

                self.kv_links = KVLinks(self.instance_id, ray.util.get_node_ip_address())
        return self.kv_links.address

    def send_blocks(self, peer_id: str, peer_address: str, key: str, block_ids: list[int], tag: int,
                    background: bool = True) -> None:
        """Send these blocks' KV, all layers, to instance `peer_id` over the pair's gloo link, beside a
        running step; the peer takes them with `receive_blocks` and the same key and tag."""
        _copy_priority(background)
        self.kv_links.send(peer_id, peer_address, key, self.executor.read_blocks(block_ids), tag)

    def receive_blocks(self, peer_id: str, peer_address: str, key: str, block_ids: list[int], dtype: str, tag: int,
                       background: bool = True) -> None:
        """Store the KV that `peer_id` sends with `send_blocks` (in its cache's `dtype`) into reserved `block_ids`."""
        from shunter.runtime.torch_channel import dtype_named

        _copy_priority(background)
        payload = self.kv_links.receive(peer_id, peer_address, key, self.executor.blocks_shape(len(block_ids)),
                                        dtype_named(dtype), tag)
        self.executor.write_blocks(block_ids, payload)

    def forget_link_peer(self, peer_id: str) -> None:
        """Drop this instance's gloo links to `peer_id`, which is gone."""
        if self.kv_links is not None:
            self.kv_links.forget(peer_id)

    def recorded_steps(self) -> list:
        return list(self.loop.step_log or [])

    def shutdown(self) -> None:
        self.loop.stop()


# The nice value of the threads that copy KV for a migration's background stages: such a copy is
# background work, and where the cores are all busy (instances share them) the steps, the instances'
# own and their neighbours', come first. A copy then takes longer; nobody's tokens do. The final
# stage's copy is not background work: the request waits on it. Not 19: on a core its instance's
# steps keep busy, a nice-19 thread gets ~1.5 % of it (CFS weights 15 vs 1024), and an 8,000-token
# stage through the object store (the source reads its blocks) ran past the 10 s stage timeout;
# at nice 10 it gets ~10 %.
COPY_THREAD_NICE = 10


def _copy_priority(background: bool) -> None:
    """A background stage's copy lowers its thread's CPU priority to COPY_THREAD_NICE (Linux: a
    thread's own nice value; once per thread is enough) and so yields the CPU to the steps. A final
    stage's copy, which the request waits on, keeps the normal priority: it comes in a concurrency
    group of its own, whose threads are never lowered (an unprivileged thread cannot raise its
    priority again)."""
    if not background or getattr(_copy_thread, "niced", False):
        return
    _copy_thread.niced = True
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COPY_THREAD_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: copies run at the normal priority
        pass


_copy_thread = threading.local()


def _actor_class():
    import ray

    # "copy": background stages' copies, at a low CPU priority; "final_copy": final stages' copies.
    return ray.remote(concurrency_groups={"poll": 2, "copy": 2, "final_copy": 2})(InstanceWorker)


class RayInstance(InstanceHandle):
    """An instance in a Ray actor (on this machine or any node of the Ray cluster)."""

    def __init__(self, instance_id: str, spec: InstanceSpec, role: str = "mixed") -> None:
        super().__init__(instance_id, spec, role)
        self.actor = None
        self.kv_share = None  # where the cache is, when it is in shared memory
        self.kv_link = None  # where its torch-distributed links meet ("host:port"), once asked

    async def start(self) -> None:
        import ray

        env = {}
        if self.spec.num_threads is not None:
            # OpenMP reads these at start-up, before torch.set_num_threads runs.
            env = {"OMP_NUM_THREADS": str(self.spec.num_threads), "MKL_NUM_THREADS": str(self.spec.num_threads)}
        # num_cpus=0: the instance's torch threads are set by the spec, not by Ray's CPU slots, so
        # instances added later are never left pending for want of a free slot.
        self.actor = _actor_class().options(
            name=None, num_cpus=0, max_concurrency=1, runtime_env={"env_vars": env} if env else None,
            num_gpus=1 if (self.spec.device or "").startswith("cuda") else 0,
        ).remote(self.instance_id, self.spec)
        info = await self.actor.info.remote()
        self.config = info["config"]
        self.facts = info["facts"]
        self.last_report = info["report"]
        self.kv_share = info["kv_share"]
        self.state = InstanceState.READY

    async def poll(self, after_seq: int, timeout: float) -> list[StepMessage]:
        return await self.actor.poll.options(concurrency_group="poll").remote(after_seq, timeout)

    async def recorded_steps(self) -> list:
        return await self.actor.recorded_steps.remote()

    async def shutdown(self) -> None:
        import ray

        if self.actor is not None:
            try:
                await asyncio.wait_for(self.actor.shutdown.remote(), 5)
            except Exception:  # already dead or stuck: kill it either way
                pass
            ray.kill(self.actor)
        self.state = InstanceState.STOPPED

    def engine_call(self, name: str, *args, timeout: float = 30.0):
        import ray

        return ray.get(self.actor.engine_call.remote(name, *args), timeout=timeout)

    def copy_blocks(self, dst: InstanceHandle, src_block_ids: list[int], dst_block_ids: list[int],
                    timeout: float = 60.0, background: bool = False) -> None:
        import ray

        group = "copy" if background else "final_copy"
        channel = kv_channel(self, dst)
        link = None
        if channel == "shared-memory":
            written = [dst.actor.pull_blocks.options(concurrency_group=group).remote(
                self.kv_share, src_block_ids, dst_block_ids, dst.spec.migration_copy_rate if background else None,
                background)]
        elif channel == "torch-distributed":
            for end in (self, dst):
                if end.kv_link is None:
                    end.kv_link = ray.get(end.actor.kv_link_address.options(concurrency_group=group).remote(),
                                          timeout=timeout)
            link, tag = _link(self.instance_id, dst.instance_id), next(_link_tags)
            (a, b), generation = link
            key = f"{a}/{b}/{generation}"
            sent = self.actor.send_blocks.options(concurrency_group=group).remote(
                dst.instance_id, dst.kv_link, key, src_block_ids, tag, background)
            received = dst.actor.receive_blocks.options(concurrency_group=group).remote(
                self.instance_id, self.kv_link, key, dst_block_ids, self.facts["dtype"], tag, background)
            written = [sent, received]
        else:
            # The payload goes from this actor to the destination actor through Ray's object store;
            # the frontend passes only the reference.
            payload = self.actor.read_blocks.options(concurrency_group=group).remote(src_block_ids, background)
            written = [dst.actor.write_blocks.options(concurrency_group=group).remote(dst_block_ids, payload,
                                                                                      background)]
        try:
            ray.get(written, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            _break(link)
            raise CopyTimedOut(f"copying {len(src_block_ids)} KV blocks from instance {self.instance_id} to "
                               f"{dst.instance_id} took over {timeout:g} s",
                               lambda: ray.wait(written, num_returns=len(written), timeout=None)) from None
        except Exception:
            _break(link)
            raise

    def forget_peer(self, instance_id: str) -> None:
        if self.kv_link is not None and self.actor is not None:
            self.actor.forget_link_peer.remote(instance_id)

    def _send_add(self, request: Request) -> None:
        self.actor.add_request.remote(request)

    def _send_resume(self, state) -> None:
        self.actor.resume_request.remote(state)

    def _send_abort(self, request_id: str) -> None:
        self.actor.abort_request.remote(request_id)

    def _send_finish(self, request_id: str) -> None:
        self.actor.finish_request.remote(request_id)


def kv_channel(src: InstanceHandle, dst: InstanceHandle) -> str:
    """The channel a copy from `src` to `dst` takes: "shared-memory", "torch-distributed" or
    "object-store" (see the module's doc)."""
    if (isinstance(src, RayInstance) and isinstance(dst, RayInstance) and dst.spec.kv_channel == "torch-distributed"
            and src.facts.get("executor") == dst.facts.get("executor") == "model"):
        return "torch-distributed"
    share = getattr(src, "kv_share", None)
    if (share is not None and isinstance(dst, RayInstance) and dst.spec.kv_channel != "object-store"
            and dst.facts.get("host") == share.host):
        return "shared-memory"
    return "object-store"


# torch-distributed copies: each gets a tag of its own on its pair's link; a link whose copy failed
# or timed out is never used again (its two ends may be out of step), the pair's next copy joins a
# new one under the next generation's key.
_link_tags = itertools.count(1)
_link_generations: dict[tuple[str, str], int] = {}
_links_lock = threading.Lock()  # copies are started from the migration driver's threads


def _link(a: str, b: str) -> tuple[tuple[str, str], int]:
    """The pair of instances `a` and `b` (either direction) and the generation of its gloo link."""
    pair = (a, b) if a < b else (b, a)
    with _links_lock:
        return pair, _link_generations.get(pair, 0)


def _break(link: tuple[tuple[str, str], int] | None) -> None:
    """The link's copy failed: the pair's next copy joins a new link (unless another failure already moved it on)."""
    if link is not None:
        pair, generation = link
        with _links_lock:
            if _link_generations.get(pair, 0) == generation:
                _link_generations[pair] = generation + 1
