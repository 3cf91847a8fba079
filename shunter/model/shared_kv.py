"""A CPU KV cache in shared memory, so that another instance on the same machine can read it.

Live migration's copies then cost the source nothing: the destination opens
the source's cache and copies the request's blocks itself (a one-sided read,
like an RDMA read), while the source keeps decoding. Through Ray's object
store the source would first gather the blocks and serialise them into the
store, on the cores its own steps need (docs/benchmarks.md, "KV channel").

The cache is an anonymous memory file (Linux `memfd_create`): it has no name
in any file system, so nothing is left behind when its process dies, however it
dies; while the process lives, a process of the same user opens it through
`/proc/<pid>/fd/<fd>`. Its pages start zeroed and are only touched when
written, like the calloc'd cache of `LlamaModel.new_kv_cache`.

Safety of reading beside the owner's steps is the coordinator's (copy_safe in
shunter/runtime/handles.py): only blocks nobody writes during the copy are read.
"""

from __future__ import annotations

import math
import mmap
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

PACE_MIN_SLEEP = 0.002  # seconds
# numpy holds the bytes; torch reinterprets them (numpy has no bfloat16).
_RAW_DTYPE = {2: np.uint16, 4: np.uint32}


@dataclass(frozen=True)
class KVShare:
    """What another process needs to open a `SharedKVCache`: where it is and its tensor's shape."""

    host: str
    pid: int
    fd: int
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/fd/{self.fd}"


def shared_memory_available() -> bool:
    """Whether this platform can make shared caches (Linux with memfd and /proc)."""
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


class SharedKVCache:
    """A zeroed tensor of `shape` and `dtype` backed by an anonymous shared-memory file."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        nbytes = math.prod(shape) * dtype.itemsize
        self.fd = os.memfd_create("shunter-kv-cache", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, nbytes)
            self._map = mmap.mmap(self.fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.tensor = _tensor_over(self._map, shape, dtype)
        self.share = KVShare(os.uname().nodename, os.getpid(), self.fd, tuple(shape), str(dtype).removeprefix("torch."))


@torch.inference_mode()
def copy_shared_blocks(share: KVShare, src_block_ids: list[int], dest: torch.Tensor, dest_block_ids: list[int],
                       max_bytes_per_s: float | None = None) -> None:
    """Copy blocks `src_block_ids` of the cache `share` describes into `dest_block_ids` of `dest`, all layers.

    max_bytes_per_s: copy no faster than this on average (None: as fast as memory goes). The
    source's decode steps read their KV and weights from the same memory, and a copy at full
    speed takes a share of its bandwidth that they feel; a paced copy takes longer and they don't.
    """
    dtype = getattr(torch, share.dtype)
    nbytes = math.prod(share.shape) * dtype.itemsize
    with open(share.path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        _copy_layers(mapped, share, dtype, src_block_ids, dest, dest_block_ids, max_bytes_per_s)
    finally:
        try:
            mapped.close()
        except BufferError:  # a traceback still holds a view of it: the map goes when that does
            pass


def _copy_layers(mapped: mmap.mmap, share: KVShare, dtype: torch.dtype, src_block_ids: list[int],
                 dest: torch.Tensor, dest_block_ids: list[int], max_bytes_per_s: float | None) -> None:
    src = _tensor_over(mapped, share.shape, dtype)
    cast = dtype != dest.dtype or dest.device.type != "cpu"
    # Runs of consecutive blocks on both sides are one slice copy each, with no staging copy: block
    # tables are mostly such runs, and every byte moved is memory bandwidth the source's own steps
    # (which read the same KV) do not get.
    pace = _Pace(max_bytes_per_s)
    for (s0, d0, n) in block_runs(src_block_ids, dest_block_ids):
        for layer in range(share.shape[0]):
            part = src[layer, s0:s0 + n]
            dest[layer, d0:d0 + n].copy_(part.to(device=dest.device, dtype=dest.dtype) if cast else part)
            pace.moved(part.numel() * part.element_size())


def _tensor_over(buffer: mmap.mmap, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` and `dtype` viewing `buffer`'s bytes (no copy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only map: torch warns; its readers only read
        raw = torch.from_numpy(np.frombuffer(buffer, dtype=_RAW_DTYPE[dtype.itemsize]).reshape(shape))
    return raw.view(dtype)


class _Pace:
    """Sleeps as needed so that the bytes reported by `moved` go no faster than `max_bytes_per_s`."""

    def __init__(self, max_bytes_per_s: float | None) -> None:
        self.max_bytes_per_s = max_bytes_per_s
        self.started = time.perf_counter()
        self.num_bytes = 0

    def moved(self, num_bytes: int) -> None:
        if not self.max_bytes_per_s:
            return
        self.num_bytes += num_bytes
        ahead = self.num_bytes / self.max_bytes_per_s - (time.perf_counter() - self.started)
        if ahead > PACE_MIN_SLEEP:  # short sleeps would cost more than they spare
            time.sleep(ahead)


def block_runs(src_block_ids: list[int], dest_block_ids: list[int]) -> list[tuple[int, int, int]]:
    """(first source block, first destination block, length) of each run consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_block_ids, dest_block_ids):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs
