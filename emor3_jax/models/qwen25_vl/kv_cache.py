"""The decoder's KV cache: every layer's keys and values, stored in the compute dtype or as int8.

Letters: Y layers, B rows, S cache entries, T new entries, K kv heads, H head dim.

Keys and values are [Y, B, S, K, H]. With int8 storage (`sampling.kv_cache_dtype="int8"`) each
entry of each kv head is quantized on its own, symmetric absmax over H:

    scale = max_h |x_h| / 127,  q_h = round(x_h / scale) in [-127, 127],  x_h ~ q_h * scale

so |x_h - q_h * scale| <= scale / 2 = absmax / 254. The int8 values are stored in pairs, an
int16 word per two neighbours along K * H: [Y, B, S, K * H / 2], an entry's kv heads side by
side. Why (3b decode compiled for v6e): TPUs pack int8 four entries to a 32-bit word along the
second-minor dim, so [.., K, H] int8 padded 3b's K = 2 to 4 (as many bytes as bf16), and
[.., S, K * H] int8 made XLA relay the whole cache out around each step's one-entry-per-row
write (15 GB accessed in the decode program's cost analysis against bf16's 5); int32 words
[.., K * H / 4] pad 3b's 64 lanes to 128 (38 GB). int16 pairs are written in place like bf16
(5.4 GB, temp as bf16's), and read back with a bitcast.

The scales are fp32 [Y, B, K, S]: fp32 because a scale rounded to bf16 (2**-9 relative) would
shift every dequantized value of its entry by up to 127 * 2**-9 of a step, more than the
rounding itself; the entry axis is minor-most, so the decode kernels read a block of entries'
scales as one lane row [K, block] that multiplies the [G, block] logits and probabilities
([B, S, K] would pad K to 128 lanes). Decode attention never materialises the dequantized
cache: keys' scales multiply the logits (q . k_e * s_e = q . (k_e * s_e)), values' scales the
probabilities (sum_e p_e s_e v_e).

A cache written in the compute dtype has no scales (None): the same leaves, programs and
numbers as before int8 existed.

Paged (`PagedKVCache`): a pool of pages, each a `KVCache` row of `page` entries, [Y, pages,
page, K, H] (or int8 pairs and scales as above), and a page table [B, E / page] naming the page
that holds each row's entries [i * page, (i + 1) * page). Rows that share a prompt share its
pages; a row's entry e is page table[b, e // page], offset e % page. Decode writes and reads
go through the table; who owns which page is the sampler's business (sampling/pages.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec

from emor3_jax.core import sharding
from emor3_jax.models.qwen25_vl.config import TextConfig
from emor3_jax.models.qwen25_vl.stack import LAYER_AXIS

KV_DTYPES = ("", "int8")  # "": the compute dtype
K_CACHE_AXES = V_CACHE_AXES = (LAYER_AXIS, "batch", "seq", "kv_heads", "head_dim")
INT8_AXES = (LAYER_AXIS, "batch", "seq", "kv_heads")  # [Y, B, S, K * H / 2]: split by whole kv heads
PAIR = jnp.int16  # the word two int8 values are stored in
SCALE_AXES = (LAYER_AXIS, "batch", "kv_heads", "seq")
SCALE_DTYPE = jnp.float32
QMAX = 127  # symmetric: -128 is never used, so q and -q are both representable


@struct.dataclass
class KVCache:
    """keys / values [Y, B, S, K, H] in the compute dtype, or int8 pairs [Y, B, S, K * H / 2]
    int16 with key_scale / value_scale [Y, B, K, S] fp32 (else None). A decode step writes one
    [K, H] entry per row, whole minor tiles, so XLA updates keys and values in place (with the entry axis minor-most
    but one, the 3b decode compiled for v5p copied the cache: 10.6 GiB temp per chip instead of
    2.1); each row's entries are contiguous, the blocks the live-span decode kernels read."""

    keys: jax.Array
    values: jax.Array
    key_scale: jax.Array | None = None
    value_scale: jax.Array | None = None

    @property
    def quantized(self) -> bool:
        return self.key_scale is not None


@struct.dataclass
class PagedKVCache:
    """pool: a `KVCache` whose rows are pages [Y, pages, page, ...]; table [B, E / page] int32:
    row b's entry e lives in page table[b, e // page] at offset e % page. Table entries past a
    row's live span may name any page (a spare one): decode attention never reads them as live."""

    pool: KVCache
    table: jax.Array

    @property
    def page(self) -> int:
        return self.pool.keys.shape[2]


def cache_shapes(cfg: TextConfig, rows: int, entries: int, dtype, kv_dtype: str) -> dict[str, tuple]:
    """{KVCache field: (logical axes, shape, dtype)} of a cache of `rows` rows, `entries` entries
    each; dtype: the compute dtype, kv_dtype: one of KV_DTYPES."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_dtype!r}: expected one of {KV_DTYPES}")
    y, k, h = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    kv = (y, rows, entries, k, h)
    stored = jnp.dtype(kv_dtype or dtype)
    if not kv_dtype:
        return dict(keys=(K_CACHE_AXES, kv, stored), values=(V_CACHE_AXES, kv, stored))
    packed, scale = (y, rows, entries, k * h // 2), (y, rows, k, entries)
    return dict(
        keys=(INT8_AXES, packed, jnp.dtype(PAIR)),
        values=(INT8_AXES, packed, jnp.dtype(PAIR)),
        key_scale=(SCALE_AXES, scale, SCALE_DTYPE),
        value_scale=(SCALE_AXES, scale, SCALE_DTYPE),
    )


def empty(cfg: TextConfig, rows: int, entries: int, dtype, kv_dtype: str) -> KVCache:
    """A zero cache (`cache_shapes`), sharded by its logical axes (inside jit)."""
    leaves = cache_shapes(cfg, rows, entries, dtype, kv_dtype)
    return KVCache(**{name: sharding.constrain(jnp.zeros(s, d), axes) for name, (axes, s, d) in leaves.items()})


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., H] -> (q [..., H] int8, scale [...] fp32), symmetric absmax over H (see above).
    An all-zero vector gets scale 0 and q 0."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / QMAX
    safe = jnp.where(scale > 0, scale, 1.0)  # 0 / 0 would be NaN
    q = jnp.clip(jnp.round(x32 / safe[..., None]), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """q [..., H] int8, scale [...] -> fp32 [..., H]."""
    return q.astype(jnp.float32) * scale[..., None]


def _stored(cache: KVCache, k: jax.Array, v: jax.Array) -> dict[str, jax.Array]:
    """New keys / values [B, T, K, H] as the cache stores them: {field: [B, T, K, H], or int8
    pairs [B, T, K * H / 2] and scales [B, K, T]}."""
    if not cache.quantized:
        return dict(keys=k.astype(cache.keys.dtype), values=v.astype(cache.values.dtype))
    (kq, ks), (vq, vs) = quantize(k), quantize(v)
    b, t = k.shape[:2]
    pack = lambda x: jax.lax.bitcast_convert_type(x.reshape(b, t, -1, 2), PAIR)
    return dict(keys=pack(kq), values=pack(vq), key_scale=ks.swapaxes(1, 2), value_scale=vs.swapaxes(1, 2))


def write_prefill(cache: KVCache, k: jax.Array, v: jax.Array, layer) -> KVCache:
    """k / v [B, T, K, H] written at entries 0..T-1 of layer `layer`."""
    new = _stored(cache, k, v)
    return cache.replace(
        **{
            f: jax.lax.dynamic_update_slice(getattr(cache, f), x[None], (layer,) + (0,) * x.ndim)
            for f, x in new.items()
        }
    )


def write_rows(
    cache: KVCache | PagedKVCache, k: jax.Array, v: jax.Array, layer, index: jax.Array
) -> KVCache | PagedKVCache:
    """k / v [B, 1, K, H] written at layer `layer`, entry index [B] of each row (of a paged
    cache: at page table[b, index[b] // page], offset index[b] % page)."""
    if isinstance(cache, PagedKVCache):
        pages = cache.table[jnp.arange(index.shape[0]), index // cache.page]
        return cache.replace(pool=_write(cache.pool, k, v, layer, pages, index % cache.page))
    return _write(cache, k, v, layer, None, index)


def _write(cache: KVCache, k: jax.Array, v: jax.Array, layer, rows: jax.Array | None, index: jax.Array) -> KVCache:
    """k / v [B, 1, K, H] written at layer `layer`, row rows[b] (None: row b), entry index[b]."""
    axes = _axes(cache)
    entry = lambda f, x: x[..., 0] if axes[f] == SCALE_AXES else x[:, 0]  # drop T = 1
    new = _stored(cache, k, v)
    return cache.replace(
        **{f: _write_rows(getattr(cache, f), entry(f, x), layer, rows, index, axes[f]) for f, x in new.items()}
    )


def _write_rows(
    leaf: jax.Array, new: jax.Array, layer, rows: jax.Array | None, index: jax.Array, axes: tuple
) -> jax.Array:
    """leaf [Y, R, S, ...] with new [B, ...] at (layer, rows[b], index[b]), or scales [Y, R, K, S]
    with new [B, K] at (layer, rows[b], :, index[b]); rows None: row b (R = B). A scatter on
    each device's own rows (shard_map), which XLA does in place; across a sharded batch its
    partitioner would gather the rows and copy the cache. With the rows split, explicit rows
    (a paged pool's pages) are local: row b names a row of its own device's block."""
    scales = axes == SCALE_AXES
    if scales:
        write = lambda c, x, r, i: c.at[layer, r, :, i].set(x)
    else:
        write = lambda c, x, r, i: c.at[layer, r, i].set(x)
    local = lambda c, x, i, *r: write(c, x, r[0] if r else jnp.arange(x.shape[0]), i)
    extra = () if rows is None else (rows,)
    spec = sharding.current_spec(axes, leaf.shape)
    if spec is None:
        return local(leaf, new, index, *extra)
    entry = 3 if scales else 2
    new_spec = PartitionSpec(*(spec[d] for d in range(1, leaf.ndim) if d != entry))
    row_specs = (PartitionSpec(spec[1]),) * (1 + len(extra))
    return jax.shard_map(local, in_specs=(spec, new_spec, *row_specs), out_specs=spec, check_vma=False)(
        leaf, new, index, *extra
    )


def _from_owner(x: jax.Array, prompt, take, split, rows_split: bool) -> jax.Array:
    """take(x, q) of prefill row `prompt` on every device, inside shard_map: x [Y, Q', ...] is
    this device's block of the prefill rows when they are split over `split` (rows_split), and
    then the device holding the row sends it to all (a psum of what take returns), else all Q."""
    if not rows_split:
        return take(x, prompt)
    mine = jax.lax.axis_index(split) == prompt // x.shape[1]
    return jax.lax.psum(jnp.where(mine, take(x, prompt % x.shape[1]), 0), split)


def write_pages(pool: KVCache, prompts: KVCache, prompt, shard, ids: jax.Array, block: int) -> KVCache:
    """A paged pool with prompt `prompt` of a prefill cache prompts [Y, Q, P, ...] (scales
    [Y, Q, K, P]) in the pages ids [A] (A * page = P) of shard `shard`'s block of `block` pages
    (local ids), page by page: each sliced from the prefill cache and written with
    dynamic_update_slice, in place in the pool's own layout (one scatter of all A pages made XLA
    lay the pool out anew and copy it).

    With the pool split over the mesh's batch axis (a block per device) the copy runs per
    device (shard_map): the device holding the prompt's prefill row sends each page to all
    (a psum of one page; gathering the group's prefill cache instead cost the 3b image
    reflection's decode 4.5 GiB per chip), and only the device holding block `shard` keeps it;
    the others write their block's last page, which the caller keeps spare."""
    page = pool.keys.shape[2]

    def take(x, q, a, scales):  # page a of prompt row q of x [Y, Q', P, ...] / [Y, Q', K, P]
        at = (0, q, 0, a * page) if scales else (0, q, a * page) + (0,) * (x.ndim - 3)
        size = (x.shape[0], 1, x.shape[2], page) if scales else (x.shape[0], 1, page, *x.shape[3:])
        return jax.lax.dynamic_slice(x, at, size)

    axes, out = _axes(pool), {}
    for f, a in axes.items():
        leaf, x, scales = getattr(pool, f), getattr(prompts, f), a == SCALE_AXES
        spec = sharding.current_spec(a, leaf.shape)
        if spec is None or spec[1] is None:  # every block here
            put = lambda i, c, x=x, s=scales: jax.lax.dynamic_update_slice_in_dim(
                c, take(x, prompt, i, s).astype(c.dtype), shard * block + ids[i], axis=1
            )
            out[f] = jax.lax.fori_loop(0, ids.shape[0], put, leaf)
            continue
        x_spec = sharding.current_spec(a, x.shape)  # the prefill rows split like the pool's, or whole

        def local(c, x, shard, ids, prompt, split=spec[1], scales=scales, rows_split=x_spec[1] is not None):
            row = jnp.where(jax.lax.axis_index(split) == shard, ids, c.shape[1] - 1)

            def put(i, c):
                new = _from_owner(x, prompt, lambda x, q: take(x, q, i, scales), split, rows_split)
                return jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), row[i], axis=1)

            return jax.lax.fori_loop(0, ids.shape[0], put, c)

        scalar = PartitionSpec()
        out[f] = jax.shard_map(local, in_specs=(spec, x_spec, scalar, scalar, scalar), out_specs=spec, check_vma=False)(
            leaf, x, shard, ids, prompt
        )
    return pool.replace(**out)


def write_slot(cache: KVCache, prompts: KVCache, slot, prompt) -> KVCache:
    """A slot cache [Y, W, S, ...] (scales [Y, W, K, S]) with prompt `prompt` of a prefill cache
    prompts [Y, Q, P, ...] (scales [Y, Q, K, P]) at row `slot`, entries [0, P). With the rows
    split over the mesh's batch axis, per device (shard_map): the device holding the prompt's
    prefill row sends it to all (a psum of one row; slicing the split prefill cache made XLA
    gather the group's, 2.26 GiB of temp on the 3b image reflection's decode per v6e chip), and
    only the device holding the slot changes its block."""

    def put(c, x, slot, q, keep=None):  # row q of x [Y, Q, ...] at row slot of c; keep False: c as is
        at_c, size = (0, slot) + (0,) * (c.ndim - 2), (x.shape[0], 1, *x.shape[2:])
        new = jax.lax.dynamic_slice(x, (0, q) + (0,) * (x.ndim - 2), size)
        if keep is not None:
            new = jnp.where(keep, new, jax.lax.dynamic_slice(c, at_c, size))
        return jax.lax.dynamic_update_slice(c, new.astype(c.dtype), at_c)

    axes, out = _axes(cache), {}
    for f, a in axes.items():
        leaf, x = getattr(cache, f), getattr(prompts, f)
        spec = sharding.current_spec(a, leaf.shape)
        if spec is None or spec[1] is None:
            out[f] = put(leaf, x, slot, prompt)
            continue
        x_spec = sharding.current_spec(a, x.shape)

        def local(c, x, slot, prompt, split=spec[1], rows_split=x_spec[1] is not None):
            take = lambda x, q: jax.lax.dynamic_slice_in_dim(x, q, 1, axis=1)
            row = _from_owner(x, prompt, take, split, rows_split)
            return put(c, row, slot % c.shape[1], 0, keep=jax.lax.axis_index(split) == slot // c.shape[1])

        scalar = PartitionSpec()
        out[f] = jax.shard_map(local, in_specs=(spec, x_spec, scalar, scalar), out_specs=spec, check_vma=False)(
            leaf, x, slot, prompt
        )
    return cache.replace(**out)


def _axes(cache: KVCache) -> dict[str, tuple]:
    """Each present field's logical axes."""
    if not cache.quantized:
        return dict(keys=K_CACHE_AXES, values=V_CACHE_AXES)
    return dict(keys=INT8_AXES, values=INT8_AXES, key_scale=SCALE_AXES, value_scale=SCALE_AXES)


def constrain(cache: KVCache | PagedKVCache) -> KVCache | PagedKVCache:
    if isinstance(cache, PagedKVCache):
        return cache.replace(pool=constrain(cache.pool))
    return cache.replace(**{f: sharding.constrain(getattr(cache, f), a) for f, a in _axes(cache).items()})


def layer(cache: KVCache | PagedKVCache, i, dtype) -> tuple[jax.Array, ...]:
    """Layer i as decode attention reads it: (keys, values) [B, S, K, H] in `dtype`, or int8
    keys and values [B, S, K * H] (unpacked from their pairs) with their scales [B, K, S]. Of a
    paged cache: the same of its pool, pages for rows ([pages, page, ...], scales [pages, K, page])."""
    if isinstance(cache, PagedKVCache):
        cache = cache.pool
    take = lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
    if not cache.quantized:
        return take(cache.keys).astype(dtype), take(cache.values).astype(dtype)
    unpack = lambda w: jax.lax.bitcast_convert_type(w, jnp.int8).reshape(*w.shape[:-1], -1)
    return unpack(take(cache.keys)), unpack(take(cache.values)), take(cache.key_scale), take(cache.value_scale)
