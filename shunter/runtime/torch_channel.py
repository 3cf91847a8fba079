"""The `torch-distributed` KV channel: a migration's blocks sent from the source's process to the
destination's over a pairwise torch.distributed gloo link (TCP), on one machine or across machines.

Each instance that uses the channel listens on a `TCPStore` of its own (`KVLinks.address`). The
first copy between two instances joins them in a two-rank gloo process group, rank 0 being the
instance whose id sorts first and whose store both sides meet at; the group is kept for later
copies between the pair, in either direction. The source reads the blocks (`read_blocks`) and sends
them as raw bytes; the destination receives into a buffer of the size it computes from its own
cache's layout and the source's dtype, and stores them (`write_blocks`). Each copy has a tag of its
own, so copies between one pair in flight together are never mixed up.

Gloo moves host memory, so a CUDA cache's blocks go through a CPU copy (`read_blocks` makes one);
NCCL, which would move GPU memory directly, is not built.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a rendezvous or one send/receive waits for the other side before it fails. A stage's
# copy is bounded by the migration driver's own timeout too; this one only frees the threads of a
# link whose peer is gone.
LINK_TIMEOUT = timedelta(seconds=60)


def link_rank(instance_id: str, peer_id: str) -> int:
    """This side's rank in the pair's group: 0 for the id that sorts first (the side both meet at)."""
    if instance_id == peer_id:
        raise ValueError(f"instance {instance_id} cannot link to itself")
    return 0 if instance_id < peer_id else 1


def payload_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s bytes as a flat uint8 tensor (gloo sends any dtype this way, bfloat16 included)."""
    return tensor.contiguous().view(torch.uint8).reshape(-1)


def payload_from_bytes(raw: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor of `shape` and `dtype` that `payload_bytes` flattened into `raw`."""
    return raw.view(dtype).reshape(shape)


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype called `name` (as the instance facts write it: "bfloat16", "float32")."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown KV dtype {name!r}")
    return dtype


class KVLinks:
    """One instance's ends of its gloo links to other instances."""

    def __init__(self, instance_id: str, host: str, timeout: timedelta = LINK_TIMEOUT) -> None:
        self.instance_id = instance_id
        self.host = host
        self.timeout = timeout
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timeout)
        self.address = f"{host}:{self._store.port}"
        self._groups: dict[str, dist.ProcessGroupGloo] = {}
        self._peers: dict[str, str] = {}  # link key -> the peer's instance id
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def send(self, peer_id: str, peer_address: str, key: str, tensor: torch.Tensor, tag: int) -> None:
        """Send `tensor` (any dtype, any shape) to `peer_id`, which receives it with the same `key` and `tag`."""
        group, peer_rank = self._link(peer_id, peer_address, key)
        self._finish(key, group.send([payload_bytes(tensor)], peer_rank, tag))

    def receive(self, peer_id: str, peer_address: str, key: str, shape: tuple[int, ...], dtype: torch.dtype,
                tag: int) -> torch.Tensor:
        """The tensor of `shape` and `dtype` that `peer_id` sends with the same `key` and `tag`."""
        group, peer_rank = self._link(peer_id, peer_address, key)
        raw = torch.empty(torch.Size(shape).numel() * dtype.itemsize, dtype=torch.uint8)
        self._finish(key, group.recv([raw], peer_rank, tag))
        return payload_from_bytes(raw, shape, dtype)

    def forget(self, peer_id: str) -> None:
        """Drop the links to `peer_id` (gone: removed from the cluster, or failed)."""
        with self._locks_lock:
            for key in [k for k, p in self._peers.items() if p == peer_id]:
                self._groups.pop(key, None)
                self._peers.pop(key, None)
                self._locks.pop(key, None)

    @property
    def peers(self) -> set[str]:
        """The instances this one has a link to."""
        return {self._peers[k] for k in self._groups if k in self._peers}

    def close(self) -> None:
        """Drop every link (a peer waiting on one fails at its timeout)."""
        with self._locks_lock:
            self._groups.clear()
            self._peers.clear()

    def _finish(self, key: str, work) -> None:
        try:
            work.wait()
        except Exception:
            # A link whose transfer failed may be out of step with its peer: never reuse it. The
            # caller's next copy between the pair comes with a new key, so a new rendezvous.
            self._groups.pop(key, None)
            raise

    def _link(self, peer_id: str, peer_address: str, key: str) -> tuple[dist.ProcessGroupGloo, int]:
        """The pair's group for `key`, joined now if this side has not yet (the peer joins with the same key)."""
        rank = link_rank(self.instance_id, peer_id)
        with self._locks_lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            group = self._groups.get(key)
            if group is None:
                if rank == 0:
                    store = self._store
                else:
                    host, _, port = peer_address.rpartition(":")
                    store = dist.TCPStore(host, int(port), is_master=False, timeout=self.timeout)
                options = dist.ProcessGroupGloo._Options()
                options._timeout = self.timeout
                options._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
                group = dist.ProcessGroupGloo(dist.PrefixStore(f"shunter-kv/{key}", store), rank, 2, options)
                self._groups[key] = group
                self._peers[key] = peer_id
        return group, 1 - rank
