"""Fused attention kernels (Pallas) over segment ids: splash on TPU, flash on GPU.

Letters: B batch, T query length, S key length, N query heads, K kv heads, G = N / K query
heads per kv head, H head dim.

Both take q [B, T, N, H], k/v [B, S, K, H] and segment ids q [B, T], kv [B, S] (a query
attends to the keys of its own segment; causal: only to those at or before it, T == S) and
return [B, T, N, H]: what `layers.attention` computes with the dense mask of the same ids,
without ever holding [T, S] scores. Each kernel scales the logits by H**-0.5 as the XLA path
does. On a CPU they run in Pallas' interpret mode (slow, the kernels' own code), which is how
the tests exercise them. Under a mesh (`sharding.use_mesh`) each device runs the kernel on
its own rows and heads (shard_map): a Pallas call is opaque to XLA's partitioner, which would
otherwise gather the whole batch onto every device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from emor3_jax.core import sharding

IMPLS = ("splash", "flash")
# Where each kernel runs: its accelerator, or a CPU in interpret mode.
PLATFORMS = {"splash": ("tpu", "cpu"), "flash": ("gpu", "cpu")}
# Splash's query and key blocks: multiples of 128 (a TPU vreg's lanes) up to this many.
SPLASH_BLOCKS = (512, 256, 128)
# Segment of the positions added to reach a whole number of blocks: no real or padding token
# attends to them, and they attend to each other only (never an empty softmax), sliced off.
KERNEL_PAD = -1


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array, causal: bool, impl: str
) -> jax.Array:
    """q [B, T, N, H], k/v [B, S, K, H], q_seg [B, T], kv_seg [B, S] -> [B, T, N, H] with the
    kernel `impl` ("splash" or "flash")."""
    platform = sharding.platform()
    if platform not in PLATFORMS[impl]:
        raise ValueError(
            f"attention_impl={impl!r} runs on {' or '.join(PLATFORMS[impl])} (CPU: interpret mode), "
            f"not on {platform}; choose another model.attention_impl"
        )
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs as many queries as keys, got T={q.shape[1]}, S={k.shape[1]}")
    kernel = functools.partial(_splash if impl == "splash" else _flash, causal=causal, interpret=platform == "cpu")
    return sharding.per_shard_heads(kernel, q, 2, ((k, 2), (v, 2)), (q_seg, kv_seg))  # [B, T, N, H], [B, S, K, H]


def _pad(x: jax.Array, length: int, value=0) -> jax.Array:
    """x [B, L, ...] -> [B, length, ...], `value` appended along L."""
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, length - x.shape[1])
    return jnp.pad(x, widths, constant_values=value)


def _splash_block(n: int) -> tuple[int, int]:
    """(block, padded length) for n positions: n rounded up to 128, in the largest block of
    SPLASH_BLOCKS that divides it."""
    padded = -(-n // 128) * 128
    return next(b for b in SPLASH_BLOCKS if padded % b == 0), padded


def _splash(q, k, v, q_seg, kv_seg, *, causal: bool, interpret: bool) -> jax.Array:
    """TPU splash attention, one batch row at a time (vmap). Its multi-head kernel groups the
    query heads itself (q [N, T, H] against k/v [K, S, H], query head n on kv head n // G) and
    leaves the scale to the caller: q is scaled in fp32 before the kernel's dot."""
    b, t, n, h = q.shape
    s = k.shape[1]
    block_q, tp = _splash_block(t)
    block_kv, sp = _splash_block(s)
    q = (q.astype(jnp.float32) * h**-0.5).astype(q.dtype)
    q = jnp.swapaxes(_pad(q, tp), 1, 2)  # [B, N, Tp, H]
    k, v = (jnp.swapaxes(_pad(x, sp), 1, 2) for x in (k, v))  # [B, K, Sp, H]
    ids = splash.SegmentIds(_pad(q_seg, tp, KERNEL_PAD), _pad(kv_seg, sp, KERNEL_PAD))
    head_mask = splash.CausalMask((tp, sp)) if causal else splash.FullMask((tp, sp))
    blocks = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([head_mask] * n), block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    out = jax.vmap(kernel)(q, k, v, ids)  # [B, N, Tp, H]
    return jnp.swapaxes(out, 1, 2)[:, :t]


def _flash_length(n: int) -> int:
    """Positions the GPU kernel takes for n: its blocks are min(128, length) queries/keys
    forward and min(32, length) backward, powers of two (Triton) dividing the length."""
    return max(16, 1 << (n - 1).bit_length()) if n <= 128 else -(-n // 128) * 128


def _flash(q, k, v, q_seg, kv_seg, *, causal: bool, interpret: bool) -> jax.Array:
    """GPU flash attention (Pallas on Triton). The kernel takes one segment id per position
    for queries and keys alike, so it needs T == S and the same ids on both sides (every
    caller's self-attention); it wants a kv head per query head, so each kv head is repeated
    for its G query heads (their gradients sum back through the repeat). Head dims that are
    not a power of two (the 3b vision tower's 80) it pads itself, with masked loads."""
    b, t, n, h = q.shape
    if k.shape[1] != t or kv_seg.shape != q_seg.shape:
        raise ValueError(f"flash attention: queries and keys must be the same positions, got T={t}, S={k.shape[1]}")
    g = n // k.shape[2]
    tp = _flash_length(t)
    q, k, v = (_pad(x, tp) for x in (q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)))  # [B, Tp, N, H]
    seg = _pad(q_seg, tp, KERNEL_PAD)
    out = gpu_attention.mha(q, k, v, seg, sm_scale=h**-0.5, causal=causal, interpret=interpret)
    return out[:, :t]
