"""GPU catalog for the roofline latency model.

Figures are vendor datasheet peaks, dense (no 2:4 sparsity) BF16 tensor-core
FLOP/s and HBM/GDDR bandwidth; `memory_bytes` is the total that `nvidia-smi`
reports (what an engine's memory probe sees), not the marketing GB.
`allreduce_bytes_per_s` is the bus bandwidth NCCL all-reduce typically reaches
between GPUs of one server (nccl-tests `busbw`): NVLink on SXM parts, PCIe 4.0
peer-to-peer on the PCIe cards. It only matters for tensor parallelism.

Sources: NVIDIA datasheets — A10 (125 TF BF16, 600 GB/s, 24 GB GDDR6), L4
(121 TF, 300 GB/s, 24 GB), L40S (362 TF, 864 GB/s, 48 GB), A40 (149.7 TF,
696 GB/s, 48 GB), A100 40GB SXM (312 TF, 1,555 GB/s), A100 80GB SXM (312 TF,
2,039 GB/s), H100 SXM (989 TF, 3.35 TB/s, 80 GB), H200 SXM (989 TF, 4.8 TB/s,
141 GB). See docs/simulator.md for the table.
"""

from __future__ import annotations

from dataclasses import dataclass

from shunter.registry import Registry

MIB = 1 << 20


@dataclass(frozen=True)
class GPU:
    """One GPU model's peaks (see the module docstring for sources)."""

    name: str
    peak_flops: float  # dense BF16 tensor-core FLOP/s
    memory_bandwidth: float  # bytes/s
    memory_bytes: int  # total device memory as nvidia-smi reports it
    allreduce_bytes_per_s: float  # NCCL all-reduce bus bandwidth within a server

    def __post_init__(self) -> None:
        if min(self.peak_flops, self.memory_bandwidth, self.memory_bytes, self.allreduce_bytes_per_s) <= 0:
            raise ValueError(f"GPU {self.name!r}: every figure must be positive")


HARDWARE: Registry[GPU] = Registry("hardware")

_NVLINK_A100 = 230e9  # nccl-tests all-reduce busbw, 8x A100 SXM (NVLink 3)
_NVLINK_H100 = 370e9  # nccl-tests all-reduce busbw, 8x H100 SXM (NVLink 4)
_PCIE4 = 20e9  # PCIe 4.0 x16 peer-to-peer, what all-reduce reaches in practice

for _gpu in (
    GPU("a10", 125e12, 600e9, 23028 * MIB, _PCIE4),
    GPU("l4", 121e12, 300e9, 23034 * MIB, _PCIE4),
    GPU("l40s", 362.05e12, 864e9, 46068 * MIB, _PCIE4),
    GPU("a40", 149.7e12, 696e9, 46068 * MIB, _PCIE4),
    GPU("a100-40gb", 312e12, 1555e9, 40960 * MIB, _NVLINK_A100),
    GPU("a100-80gb", 312e12, 2039e9, 81920 * MIB, _NVLINK_A100),
    GPU("h100", 989.4e12, 3350e9, 81559 * MIB, _NVLINK_H100),
    GPU("h200", 989.4e12, 4800e9, 143771 * MIB, _NVLINK_H100),
):
    HARDWARE.register(_gpu.name, _gpu)


def get_gpu(name: str) -> GPU:
    """The GPU named `name`; ValueError listing the catalog otherwise."""
    return HARDWARE.get(name)
