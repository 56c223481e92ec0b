"""NVIDIA GPUs that `--compile_for=h100:N` / `h200:N` compiles for without one: each GPU's
figures with their sources, and the GpuTargetConfig text XLA's CUDA compiler takes in place
of an attached device (`jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=...)`; the `compile-gpu` extra installs the compiler, jax[cuda12]).

The text holds what the compiler reads to plan kernels and memory: the SM count, its limits
per block and per SM, clock, L2, device memory and bandwidth. Both GPUs are Hopper (GH100,
compute capability 9.0), so they share the per-SM limits and differ in memory.
"""

from __future__ import annotations

import dataclasses

MiB = 1024**2

# Compute capability 9.0's limits: CUDA C++ Programming Guide, "Compute Capabilities",
# table "Technical Specifications per Compute Capability" (column 9.0); FP32 cores per SM:
# NVIDIA H100 Tensor Core GPU Architecture whitepaper (128 per SM).
HOPPER_SM = dict(
    threads_per_block_limit=1024,
    threads_per_warp=32,
    shared_memory_per_block=48 * 1024,
    shared_memory_per_block_optin=227 * 1024,
    shared_memory_per_core=228 * 1024,
    threads_per_core_limit=2048,
    registers_per_core_limit=64 * 1024,
    registers_per_block_limit=64 * 1024,
    fpus_per_core=128,
    block_dim_limit_x=2**31 - 1,
    block_dim_limit_y=65535,
    block_dim_limit_z=65535,
    thread_dim_limit_x=1024,
    thread_dim_limit_y=1024,
    thread_dim_limit_z=64,
)


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One GPU model: what nvidia-smi calls it, SMs, device memory (bytes, as NVML reports the
    total), HBM bytes/s, dense bf16 flop/s, boost clock (GHz), L2 bytes; and the sources."""

    name: str
    sms: int
    memory_bytes: int
    hbm_bytes_per_s: float
    bf16_flops: float
    clock_ghz: float
    l2_bytes: int
    source: str


# The datasheets give bf16 "with sparsity" (1,979 TFLOPS); dense is half. Memory: NVML's total
# (nvidia-smi), a little over the marketed GB read as GiB for the H100, under it for the H200.
_MEMORY = "nvidia-smi totals, tabulated at thundergolfer.com/blog/nvidia-gpu-memory-capacity"
GPUS = {
    "h100": Gpu(
        "NVIDIA H100 80GB HBM3",
        132,
        81559 * MiB,
        3.35e12,
        989.4e12,
        1.98,
        50 * MiB,
        "nvidia.com/en-us/data-center/h100 (H100 SXM: 989 TFLOPS bf16 dense, 80 GB HBM3, 3.35 TB/s); "
        f"H100 whitepaper: 132 SMs, 50 MB L2, 1.98 GHz boost; {_MEMORY}: 81,559 MiB",
    ),
    "h200": Gpu(
        "NVIDIA H200",
        132,
        143771 * MiB,
        4.8e12,
        989.4e12,
        1.98,
        50 * MiB,
        "nvidia.com/en-us/data-center/h200 (H200 SXM: 989 TFLOPS bf16 dense, 141 GB HBM3e, 4.8 TB/s; "
        f"the H100's GH100 chip: 132 SMs, 50 MB L2, 1.98 GHz boost); {_MEMORY}: 143,771 MiB",
    ),
}


def target_config(gpu: Gpu) -> str:
    """`gpu` as a stream_executor.GpuTargetConfigProto in text format."""
    info = dict(
        HOPPER_SM,
        core_count=gpu.sms,
        memory_bandwidth=int(gpu.hbm_bytes_per_s),
        l2_cache_size=gpu.l2_bytes,
        clock_rate_ghz=gpu.clock_ghz,
        device_memory_size=gpu.memory_bytes,
    )
    fields = "".join(f"  {k}: {v}\n" for k, v in info.items())
    return (
        "gpu_device_info {\n"
        f"{fields}"
        "  cuda_compute_capability { major: 9 minor: 0 }\n"
        '  device_vendor: "NVIDIA Corporation"\n'
        f'  name: "{gpu.name}"\n'
        "}\n"
        'platform_name: "CUDA"\n'
        f'device_description_str: "{gpu.name}"\n'
    )
