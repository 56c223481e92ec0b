"""Decode attention over the live span of each row's KV cache.

Einsum letters: B batch, S cache length, N query heads, K kv heads, G query heads per kv head
(N = K * G), H head dim.

Row b's live keys / values are cache entries [start[b], end[b]) (a left-padded prompt followed by
the tokens generated so far); everything else in the row is dead and may hold anything. One new
query token per row. Three implementations of the same function:

- "xla": dense masked softmax over all S entries (the reference; reads the whole cache).
- "tpu": our Pallas TPU kernel; grid (B, S // block), fetches only the blocks that overlap the
  span (`live_blocks` counts them; `bytes_read` turns that into bytes). Dead steps copy and
  compute nothing but still pay the fixed cost of a grid step.
- "gpu": jax's Pallas GPU (Triton) `decode_attention.gqa`, which takes the span per row as
  `start_idx` / `kv_seq_len`.

An int8 cache (kv_cache.py) is [B, S, K * H] (an entry's kv heads side by side) with fp32
scales [B, K, S], one per entry and kv head: "xla"
and "tpu" read the int8 entries, convert them to q's dtype (exact: |q| <= 127) and apply the
scales to the [G, S] logits (keys) and probabilities (values), so no dequantized copy exists.
"gpu" refuses it: jax's kernel takes no scales, and dequantizing a layer's cache ahead of it
would write and read a compute-dtype copy, more bytes than the cache it replaces.

A paged cache (`pages` [B, S / page], kv_cache.PagedKVCache) is a pool of pages [pages, page,
K, H] (int8: [pages, page, K * H], scales [pages, K, page]) and each row's page table: entry e
of row b is page pages[b, e // page], offset e % page. "xla" gathers each row's pages into the
[B, S, ...] cache above (the reference); "tpu" maps its grid step j through the table (block =
page), so it still fetches only the live pages; "gpu" refuses it (jax's gqa reads contiguous rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.gpu import decode_attention as gpu_decode

from emor3_jax.core import sharding

IMPLS = ("xla", "tpu", "gpu")
LANES = 128  # TPU vreg lane width: the kv block is the lane axis of the [G, block] logits
TPU_DEFAULT_BLOCK = 512
GPU_SPLITS = (16, 8, 4, 2, 1)  # k_splits candidates, most first; 16 is jax's default for gqa
GPU_BLOCK_KS = (128, 64, 32, 16)  # block_k candidates, largest first; 128 is jax's default
GPU_MIN_TILE = 16  # Triton's tl.dot needs every matmul dim >= 16
GPU_BLOCK_H = 16  # query heads per Triton program; G < 16 is masked inside the kernel


def ragged_decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    start: jax.Array,
    end: jax.Array,
    *,
    impl: str,
    interpret: bool | None = None,
    block: int | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    pages: jax.Array | None = None,
) -> jax.Array:
    """One query token per row against the live span [start, end) of its cache row.

    q [B, N, H], k_cache / v_cache [B, S, K, H], start / end [B] int32 -> [B, N, H] in q's dtype.
    Logits and softmax in fp32, scale H**-0.5. q, k_cache and v_cache share one dtype (the model
    writes the cache in its compute dtype), or k_cache / v_cache are int8 [B, S, K * H] with
    k_scale / v_scale [B, K, S] fp32 (entry e of kv head k is k_cache[b, e, k*H:(k+1)*H] *
    k_scale[b, k, e]; "xla", "tpu").

    pages [B, S / page] int32 (a paged cache, see above): k_cache / v_cache (and the scales)
    are a pool of pages; "xla" and "tpu" (block = page, a multiple of 128).

    The caller guarantees 0 <= start < end <= S per row (traced values, not checked); dead
    entries never reach the result for "xla" and "tpu" even when they are NaN.

    impl "xla": `block` must be None.
    impl "tpu": `block` = cache entries per grid step; a multiple of 128 (the lane width: the
      block is the last axis of the [G, block] logits and the sublane axis of the [block, H]
      k / v tiles, so it also meets the 8 (fp32) / 16 (bf16) sublane tiling) and S % block == 0
      (no padding: pad the cache length instead, it is fixed at allocation). Default: the largest
      multiple of 128 up to 512 that divides S. G and H are whole-array block dims, so any value.
    impl "gpu": jax's `gqa` splits S into `k_splits` equal parts of `S // k_splits` (>= 16)
      entries, each walked in chunks of `block_k` (>= 16, dividing the part); Triton needs
      power-of-two load shapes, so H must be a power of two >= 16 (also tl.dot's minimum), and
      block_k a power of two. We take the most splits (<= 16) whose part is a multiple of 16,
      then `block` = block_k (default: the largest power of two <= 128 dividing the part). So S
      must be a multiple of 16. Partial outputs per split are stored, rescaled and summed in q's
      dtype (jax's kernel), then divided by the fp32 sums. Dead entries inside a split that
      overlaps the span are read and masked by adding 0.7 * finfo.min, so they must be finite (a
      NaN there reaches the result; a zero- or prompt-filled cache is fine).
    interpret: run the Pallas kernels in interpret mode (TPU interpret mode for "tpu"); None means
      True when the program is built for a CPU (`sharding.platform`: the mesh's platform, so a
      TPU program compiled on a CPU host gets the real kernel).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if pages is not None:
        return _paged(q, k_cache, v_cache, start, end, k_scale, v_scale, pages, impl, interpret, block)
    _check_shapes(q, k_cache, v_cache, start, end, k_scale, v_scale)
    scales = () if k_scale is None else (k_scale, v_scale)
    if interpret is None:
        interpret = sharding.platform() == "cpu"
    if impl == "xla":
        if block is not None:
            raise ValueError(f"block={block}: impl='xla' reads the whole cache and takes no block")
        return _xla(q, k_cache, v_cache, start, end, *scales)
    if impl == "tpu":
        block = tpu_block(k_cache.shape[1], block)
        kh = k_scale.shape[1] if scales else k_cache.shape[2]
        return _tpu(q, k_cache, v_cache, start, end, *scales, kv_heads=kh, block=block, interpret=interpret)
    if scales:
        raise ValueError("impl='gpu' (jax's decode kernel) takes no int8 cache: it has no scales")
    k_splits, block_k = gpu_params(k_cache.shape[1], q.shape[2], block)
    # gqa takes the cache's own layout [B, S, K, H].
    out = gpu_decode.gqa(
        q,
        k_cache,
        v_cache,
        start_idx=start,
        kv_seq_len=end,
        sm_scale=q.shape[2] ** -0.5,
        block_h=GPU_BLOCK_H,
        block_k=block_k,
        k_splits=k_splits,
        interpret=interpret,
    )
    return out.astype(q.dtype)  # its final division by the fp32 sums promotes to fp32


def _paged(q, k_pool, v_pool, start, end, k_scale, v_scale, pages, impl, interpret, block):
    """`ragged_decode_attention` on a paged cache: the pool [pages, page, ...] read through the
    table pages [B, S / page]."""
    b, mp = pages.shape
    if pages.ndim != 2 or b != q.shape[0] or not jnp.issubdtype(pages.dtype, jnp.integer):
        raise ValueError(f"pages {pages.shape} {pages.dtype} must be an int page table [B, S / page], B = {q.shape[0]}")
    page = k_pool.shape[1]
    if impl == "gpu":
        raise ValueError("impl='gpu' (jax's gqa) reads contiguous rows: it takes no paged cache")
    if impl == "tpu":
        # the dense checks on one row's view: [1, page, ...] stands for a [B, S, ...] cache
        rows = lambda x: None if x is None else x[:1]
        _check_shapes(q[:1], k_pool[:1], v_pool[:1], start[:1], end[:1], rows(k_scale), rows(v_scale))
        if block is not None and block != page:
            raise ValueError(f"block={block}: a paged cache's block is its page ({page})")
        tpu_block(page, page)
        kh = k_scale.shape[1] if k_scale is not None else k_pool.shape[2]
        if interpret is None:
            interpret = sharding.platform() == "cpu"
        scales = () if k_scale is None else (k_scale, v_scale)
        return _tpu(q, k_pool, v_pool, start, end, *scales, kv_heads=kh, block=page, interpret=interpret, pages=pages)
    # "xla": each row's pages gathered into a [B, S, ...] cache
    gather = lambda x: x[pages].reshape(b, mp * page, *x.shape[2:])
    gather_scale = lambda x: None if x is None else x[pages].swapaxes(1, 2).reshape(b, x.shape[1], mp * page)
    k, v = gather(k_pool), gather(v_pool)
    return ragged_decode_attention(
        q, k, v, start, end, impl="xla", block=block, k_scale=gather_scale(k_scale), v_scale=gather_scale(v_scale)
    )


def sharded_decode_attention(q, k_cache, v_cache, *args, impl: str, pages: jax.Array | None = None) -> jax.Array:
    """`ragged_decode_attention` on each device's rows (and kv heads, when queries and kv heads
    split alike) under the current mesh (`sharding.per_shard_heads`: a Pallas call is opaque to
    XLA's partitioner); "xla" is partitioned by XLA as is. args: start, end, or (int8 cache)
    k_scale, v_scale, start, end. pages: a paged cache's table [B, S / page], run per device on
    every impl: with the rows split, the pool splits alike and the table names local pages."""
    *scales, start, end = args
    rows = (start, end) if pages is None else (start, end, pages)

    def run(q, k, v, *rest):
        kw = _scales(rest[: len(scales)])
        start, end, *table = rest[len(scales) :]
        return ragged_decode_attention(q, k, v, start, end, impl=impl, pages=table[0] if table else None, **kw)

    if impl == "xla" and pages is None:
        return run(q, k_cache, v_cache, *scales, *rows)
    # [B, N, H]; [B, S, K, H] and scales [B, K, S] (paged: [pages, page, K, H], [pages, K, page],
    # the table's local ids naming pages of its device's block)
    return sharding.per_shard_heads(run, q, 1, ((k_cache, 2), (v_cache, 2), *((x, 1) for x in scales)), rows)


def _scales(scales) -> dict:
    return dict(zip(("k_scale", "v_scale"), scales))


def _check_shapes(q, k_cache, v_cache, start, end, k_scale, v_scale) -> None:
    b, n, h = q.shape
    if (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale and v_scale come together (an int8 cache) or not at all")
    if k_scale is not None:
        _check_int8(q, k_cache, v_cache, k_scale, v_scale)
    elif k_cache.shape != v_cache.shape or k_cache.ndim != 4:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must both be [B, S, K, H]")
    else:
        cb, _, kh, ch = k_cache.shape
        if (cb, ch) != (b, h) or n % kh:
            raise ValueError(f"q {q.shape} [B, N, H] does not match cache {k_cache.shape} [B, S, K, H] with N % K == 0")
        if not (q.dtype == k_cache.dtype == v_cache.dtype):
            raise ValueError(f"q, k_cache, v_cache dtypes {q.dtype}, {k_cache.dtype}, {v_cache.dtype} must be equal")
    if start.shape != (b,) or end.shape != (b,):
        raise ValueError(f"start {start.shape} and end {end.shape} must both be [B] = ({b},)")


def _check_int8(q, k_cache, v_cache, k_scale, v_scale) -> None:
    b, n, h = q.shape
    kh, s = k_scale.shape[1], k_cache.shape[1]
    want = dict(k_cache=((b, s, kh * h), jnp.int8), v_cache=((b, s, kh * h), jnp.int8))
    want.update(k_scale=((b, kh, s), jnp.float32), v_scale=((b, kh, s), jnp.float32))
    got = dict(k_cache=k_cache, v_cache=v_cache, k_scale=k_scale, v_scale=v_scale)
    bad = [f"{name} {x.shape} {x.dtype}" for name, x in got.items() if (x.shape, x.dtype) != want[name]]
    if bad or n % kh:
        raise ValueError(
            f"an int8 cache is k_cache / v_cache int8 [B, S, K * H] = {(b, s, kh * h)} with scales fp32 [B, K, S] = "
            f"{(b, kh, s)} (K from the scales, N % K == 0 for q {q.shape}): got {', '.join(bad) or 'N % K != 0'}"
        )


def cache_multiple(impl: str) -> int:
    """What a cache length S must be a multiple of for `impl` (the sampler rounds S up; the
    extra entries are never live)."""
    return {"xla": 1, "tpu": LANES, "gpu": GPU_MIN_TILE}[impl]


def tpu_block(s: int, block: int | None) -> int:
    """The TPU kernel's block for cache length S: `block`, checked, or the default (see above)."""
    if block is None:
        fits = [c for c in range(TPU_DEFAULT_BLOCK, 0, -LANES) if s % c == 0]
        if not fits:
            raise ValueError(f"S={s}: the tpu kernel needs S to be a multiple of {LANES}")
        return fits[0]
    if block % LANES or s % block:
        raise ValueError(f"block={block}, S={s}: the tpu kernel needs block % {LANES} == 0 and S % block == 0")
    return block


def gpu_params(s: int, h: int, block: int | None) -> tuple[int, int]:
    """(k_splits, block_k) for jax's gqa at cache length S, head dim H (constraints above)."""
    if h < GPU_MIN_TILE or h & (h - 1):
        raise ValueError(f"H={h}: the gpu kernel (Triton) needs a power-of-two head dim >= {GPU_MIN_TILE}")
    if s % GPU_MIN_TILE:
        raise ValueError(f"S={s}: the gpu kernel needs S % {GPU_MIN_TILE} == 0 (each of its k_splits parts >= 16)")
    k_splits = next(c for c in GPU_SPLITS if s % (c * GPU_MIN_TILE) == 0)
    part = s // k_splits
    if block is None:
        block = next(c for c in GPU_BLOCK_KS if part % c == 0)
    if block < GPU_MIN_TILE or block & (block - 1) or part % block:
        raise ValueError(
            f"block={block}: the gpu kernel's block_k must be a power of two >= {GPU_MIN_TILE} dividing "
            f"S // k_splits = {s} // {k_splits} = {part}"
        )
    return k_splits, block


def _xla(q, k_cache, v_cache, start, end, k_scale=None, v_scale=None):
    if k_scale is not None:
        return _xla_int8(q, k_cache, v_cache, start, end, k_scale, v_scale)
    b, n, h = q.shape
    s, kh = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, kh, n // kh, h)  # [B, K, G, H]
    logits = jnp.einsum("bkgh,bskh->bkgs", qg, k_cache, preferred_element_type=jnp.float32) * (h**-0.5)
    pos = jnp.arange(s)
    live = (pos >= start[:, None]) & (pos < end[:, None])  # [B, S]
    # `where`, not an additive mask: a NaN logit in a dead entry must not survive.
    logits = jnp.where(live[:, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    v = jnp.where(live[:, :, None, None], v_cache, 0)  # 0 * NaN is NaN, so zero dead values too
    out = jnp.einsum("bkgs,bskh->bkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, n, h).astype(q.dtype)


def _xla_int8(q, k_cache, v_cache, start, end, k_scale, v_scale):
    """`_xla` on an int8 cache [B, S, K * H]: converted to q's dtype (exact) inside the jitted
    program, where XLA fuses the conversion into the dots; the scales go on the [B, K, G, S]
    logits (keys) and probabilities (values)."""
    b, n, h = q.shape
    s, kh = k_cache.shape[1], k_scale.shape[1]
    qg = q.reshape(b, kh, n // kh, h)  # [B, K, G, H]
    keys, values = (x.reshape(b, s, kh, h).astype(q.dtype) for x in (k_cache, v_cache))  # [B, S, K, H]
    logits = jnp.einsum("bkgh,bskh->bkgs", qg, keys, preferred_element_type=jnp.float32)
    logits = logits * (h**-0.5) * k_scale[:, :, None, :]
    pos = jnp.arange(s)
    live = (pos >= start[:, None]) & (pos < end[:, None])  # [B, S]
    logits = jnp.where(live[:, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    # int8 values are finite; a dead entry's scale may not be (0 * NaN)
    probs = probs * jnp.where(live[:, None, None, :], v_scale[:, :, None, :], 0)
    out = jnp.einsum("bkgs,bskh->bkgh", probs.astype(q.dtype), values, preferred_element_type=jnp.float32)
    return out.reshape(b, n, h).astype(q.dtype)


def kv_block_index(j, start, end, block: int):
    """The cache block the tpu kernel's k / v BlockSpec maps grid step j to.

    Clamped into the span's blocks [start // block, (end - 1) // block]: dead steps repeat the
    neighbouring live block's index, and the pipeline issues no copy when the index repeats.
    """
    # lax.div truncates (no sign fix-up like `//`), right for the non-negative start and end - 1.
    return jnp.minimum(jnp.maximum(j, lax.div(start, block)), lax.div(end - 1, block))


def live_blocks(start, end, s: int, block: int) -> np.ndarray:
    """Blocks the tpu kernel copies per row for spans [start, end): [B] from start / end [B].

    Counted from `kv_block_index` over the grid's j axis: one copy for the first step and one for
    every step whose index differs from the previous step's (grid order is b, then j; consecutive
    rows never share a block, so each row starts with a copy; a block holds every kv head).
    """
    tpu_block(s, block)
    j = np.arange(s // block, dtype=np.int32)
    span = [np.asarray(x, np.int32)[:, None] for x in (start, end)]
    idx = np.asarray(kv_block_index(j[None, :], *span, block))
    return 1 + (idx[:, 1:] != idx[:, :-1]).sum(axis=1)


def bytes_read(start, end, s: int, block: int, *, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """K and V bytes the tpu kernel fetches from HBM in one call (one layer, one decode step).

    = sum over rows of live_blocks * K * block * H * itemsize * 2 (keys and values). The query
    and output ([B, N, H] each) are not counted.
    """
    per_block = kv_heads * block * head_dim * itemsize * 2
    return int(live_blocks(start, end, s, block).sum()) * per_block


def _tpu(q, k_cache, v_cache, start, end, *scales, kv_heads: int, block: int, interpret: bool, pages=None):
    """scales: () or an int8 cache's k_scale, v_scale [B, K, S] (its k / v [B, S, K * H]).
    pages [B, S / block]: k_cache / v_cache / scales are a pool of pages of `block` entries,
    grid step j of row b reads page pages[b, j] (clamped into the live span like a block)."""
    b, n, h = q.shape
    kh, g = kv_heads, n // kv_heads
    s = k_cache.shape[1] if pages is None else pages.shape[1] * block
    steps = s // block

    if pages is None:
        prefetch = (start.astype(jnp.int32), end.astype(jnp.int32))

        def kv_map(bi, j, start_ref, end_ref):
            return bi, kv_block_index(j, start_ref[bi], end_ref[bi], block), 0

        def scale_map(bi, j, start_ref, end_ref):
            return bi, 0, kv_block_index(j, start_ref[bi], end_ref[bi], block)

    else:
        prefetch = (start.astype(jnp.int32), end.astype(jnp.int32), pages.astype(jnp.int32))

        def kv_map(bi, j, start_ref, end_ref, pages_ref):
            return pages_ref[bi, kv_block_index(j, start_ref[bi], end_ref[bi], block)], 0, 0

        scale_map = kv_map

    # Each row's cache as [S, K * H]: a block of `block` entries holds every kv head, tiled
    # (block, K * H) with no sublane padding (a [block, K, H] block would pad K to 8 or 16).
    # Scales [K, block]: one lane row per kv head, as the [G, block] logits lie.
    kv_spec = pl.BlockSpec((None, block, kh * h), kv_map)
    scale_specs = [pl.BlockSpec((None, kh, block), scale_map)] * len(scales)
    q_spec = pl.BlockSpec((None, kh, g, h), lambda bi, j, *_: (bi, 0, 0, 0))
    kernel = functools.partial(_tpu_kernel, block=block, kv_heads=kh, scale=h**-0.5, quantized=bool(scales))
    if pages is not None:  # the table is read by the index maps only
        dense = kernel
        kernel = lambda start_ref, end_ref, _pages_ref, *refs: dense(start_ref, end_ref, *refs)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(b, steps),
            in_specs=[q_spec, kv_spec, kv_spec, *scale_specs],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((kh, g, 1), jnp.float32),  # running max
                pltpu.VMEM((kh, g, 1), jnp.float32),  # running sum of exp
                pltpu.VMEM((kh, g, h), jnp.float32),  # running sum of exp * v
            ],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        out_shape=jax.ShapeDtypeStruct((b, kh, g, h), q.dtype),
        # TPU interpret mode simulates the pipeline (a copy only when a block index changes) and
        # fills uninitialized VMEM with NaN, so a missed scratch init or a dead read shows on CPU.
        interpret=pltpu.InterpretParams() if interpret else False,
    )(
        *prefetch,
        q.reshape(b, kh, g, h),
        k_cache.reshape(*k_cache.shape[:2], kh * h),
        v_cache.reshape(*v_cache.shape[:2], kh * h),
        *scales,
    )
    return out.reshape(b, n, h)


def _tpu_kernel(start_ref, end_ref, q_ref, k_ref, v_ref, *refs, block: int, kv_heads: int, scale: float, quantized):
    """One (b, j) step: q_ref [K, G, H], k_ref / v_ref [block, K * H] (block kv_block_index),
    o_ref [K, G, H]; kv head k is lanes [k * H, (k + 1) * H) of the block. quantized: k_ref /
    v_ref are int8 and refs start with their scales ks_ref / vs_ref [K, block]."""
    ks_ref, vs_ref = refs[:2] if quantized else (None, None)
    o_ref, m_ref, l_ref, acc_ref = refs[2:] if quantized else refs
    row, j = pl.program_id(0), pl.program_id(1)
    start, end = start_ref[row], end_ref[row]
    h = q_ref.shape[-1]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    # Steps outside the span hold a repeated block (see kv_block_index): skip them.
    @pl.when(kv_block_index(j, start, end, block) == j)
    def _accumulate():
        pos = j * block + lax.broadcasted_iota(jnp.int32, (block, 1), 0)
        live = (pos >= start) & (pos < end)  # [block, 1]
        for k in range(kv_heads):
            heads = slice(k * h, (k + 1) * h)
            keys, v = k_ref[:, heads], v_ref[:, heads]  # [block, H]
            if quantized:  # int8 -> q's dtype is exact; the scales go on logits and probabilities
                keys, v = keys.astype(q_ref.dtype), v.astype(q_ref.dtype)
            logits = lax.dot_general(
                q_ref[k], keys, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )  # [G, block]
            if quantized:
                logits = logits * ks_ref[k : k + 1, :]
            logits = jnp.where(live.T, logits * scale, -jnp.inf)
            m_prev = m_ref[k]  # [G, 1]
            # Finite: every visited block holds at least one live entry.
            m_next = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))
            p = jnp.exp(logits - m_next)  # [G, block], 0 on dead entries
            rescale = jnp.exp(m_prev - m_next)  # 0 on the first visited block (m_prev = -inf)
            l_ref[k] = rescale * l_ref[k] + p.sum(axis=1, keepdims=True)
            if quantized:  # int8 values are finite; a dead entry's scale may not be (0 * NaN)
                p = p * jnp.where(live.T, vs_ref[k : k + 1, :], 0)
            else:
                v = jnp.where(live, v, 0)  # 0 * NaN is NaN
            pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            acc_ref[k] = rescale * acc_ref[k] + pv
            m_ref[k] = m_next

    @pl.when(j == pl.num_programs(1) - 1)
    def _write():
        o_ref[...] = (acc_ref[...] / l_ref[...]).astype(o_ref.dtype)
