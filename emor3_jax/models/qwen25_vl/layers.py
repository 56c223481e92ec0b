"""Building blocks shared by the vision tower and the text decoder.

Einsum letters: B batch, T query length, S key length, N query heads, K kv heads,
G query heads per kv head (N = K * G), H head dim, D model dim, F mlp dim.

Every parameter carries `axes` metadata (logical axis names); `emor3_jax.core.sharding` maps
them to the mesh.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from emor3_jax.models import lora
from emor3_jax.models.qwen25_vl import fused_attention

# Initializers by name: the name is kept in the parameter's metadata so `create_model` can
# draw each parameter on its own (a few small programs instead of one for the whole model).
INITS: dict[str, Callable[..., jax.Array]] = {
    "normal": nnx.initializers.normal(0.02),
    "zeros": nnx.initializers.zeros_init(),
    "ones": nnx.initializers.ones_init(),
    # PEFT's lora_A: kaiming-uniform with a = sqrt(5) over fan_in = in (A [..., in, r]), i.e.
    # U(-1/sqrt(in), 1/sqrt(in)): a uniform draw of variance 1 / (3 in).
    "lora_a": nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-2, out_axis=-1),
}


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param(rngs: nnx.Rngs, init: str, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(INITS[init](rngs.params(), shape, dtype), axes=axes, init=init)


class Linear(nnx.Module):
    """y = x @ W (+ b), W stored [in, out] (HF stores [out, in]; convert.py transposes).

    With an `adapter` (models/lora.py), + (x @ A) @ B * scale: lora_a A [in, r] sharded on the
    kernel's `in` axis, lora_b B [r, out] on its `out` axis, r unsharded, both fp32. A call with
    a `lora.Dropout` drops out the adapter's input alone: + (dropout(x) @ A) @ B * scale."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        axes: tuple[str | None, str | None],
        *,
        bias: bool,
        param_dtype,
        compute_dtype,
        rngs: nnx.Rngs,
        adapter: lora.Adapter | None = None,
    ):
        self.kernel = param(rngs, "normal", (d_in, d_out), axes, param_dtype)
        self.bias = param(rngs, "zeros", (d_out,), (axes[1],), param_dtype) if bias else None
        self.compute_dtype = compute_dtype
        self.lora_a = _lora(rngs, "lora_a", (d_in, adapter.rank), (axes[0], None), adapter) if adapter else None
        self.lora_b = _lora(rngs, "zeros", (adapter.rank, d_out), (None, axes[1]), adapter) if adapter else None

    def __call__(self, x: jax.Array, dropout: lora.Dropout | None = None) -> jax.Array:
        """x [..., in] -> [..., out]. The leading dims are flattened into one for the matmul: the
        weight gradient is then one plain [in, M] x [M, out] product (XLA's CPU backend is ~2.5x
        slower at an MLP's backward with [B, T] kept apart); on GPU/TPU it is the same program.
        `dropout` (ignored without an adapter): the mask over x [M, in] of the adapter's term."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).astype(self.compute_dtype)
        y = jnp.dot(x2, self.kernel[...].astype(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype)
        if self.lora_a is not None:
            a, b = (m[...].astype(self.compute_dtype) for m in (self.lora_a, self.lora_b))
            xa = x2 if dropout is None else lora.drop(x2, dropout)
            y = y + jnp.dot(jnp.dot(xa, a), b) * self.lora_a.get_metadata()["scale"]
        return y.reshape(*lead, y.shape[-1])


def _lora(rngs: nnx.Rngs, init: str, shape: tuple[int, int], axes, adapter: lora.Adapter) -> lora.LoRAParam:
    """An adapter matrix in lora.DTYPE, its scale in its metadata (lora.merged reads it)."""
    value = INITS[init](rngs.params(), shape, lora.DTYPE)
    return lora.LoRAParam(value, axes=axes, init=init, scale=adapter.scale)


class RMSNorm(nnx.Module):
    """x / rms(x) * w, the statistics in fp32 (as transformers does)."""

    def __init__(self, dim: int, eps: float, axis_name: str, *, param_dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, "ones", (dim,), (axis_name,), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class GatedMLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(
        self,
        d: int,
        f: int,
        axes: tuple[str, str],
        *,
        bias: bool,
        param_dtype,
        compute_dtype,
        rngs: nnx.Rngs,
        adapter: lora.Adapter | None = None,
    ):
        kw = dict(bias=bias, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs, adapter=adapter)
        self.gate_proj = Linear(d, f, axes, **kw)
        self.up_proj = Linear(d, f, axes, **kw)
        self.down_proj = Linear(f, d, (axes[1], axes[0]), **kw)

    def __call__(self, x: jax.Array, dropout: lora.Dropout | None = None) -> jax.Array:
        """x [..., D] -> [..., D]; `dropout` folded with 4, 5, 6 for gate, up, down (0-3 are the
        attention projections of the same layer)."""
        gate = jax.nn.silu(self.gate_proj(x, lora.fold(dropout, 4)))
        return self.down_proj(gate * self.up_proj(x, lora.fold(dropout, 5)), lora.fold(dropout, 6))


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., T, N, H] rotated by cos/sin [..., T, H] (fp32 math, result in x's dtype)."""
    x32 = x.astype(jnp.float32)
    out = x32 * cos[..., None, :] + rotate_half(x32) * sin[..., None, :]
    return out.astype(x.dtype)


@struct.dataclass
class Segments:
    """Who attends to whom, as segment ids: what the fused kernels take instead of a mask.

    q [B, T], kv [B, S] int32: a query attends to the keys of its own segment; with `causal`
    (static; T == S) only to those at or before it. 0 is padding: no real token (id >= 1)
    attends to it. Padding attends to padding, so no query has an empty softmax (0/0 in a
    fused kernel, which takes only this equality mask); padding's outputs are never read.
    """

    q: jax.Array
    kv: jax.Array
    causal: bool = struct.field(pytree_node=False)

    def mask(self, start: jax.Array | int = 0) -> jax.Array:
        """The dense mask [B, 1, T, S] (True = attend), the queries at positions start..start+T-1."""
        mask = self.q[:, :, None] == self.kv[:, None, :]  # [B, T, S]
        if self.causal:
            t, s = self.q.shape[1], self.kv.shape[1]
            mask = mask & ((start + jnp.arange(t))[:, None] >= jnp.arange(s)[None, :])
        return mask[:, None]


# Queries per block: past this many, attention runs one block of queries at a time, so a
# layer holds [B, N, block, S] scores instead of [B, N, T, S] (a 4,096-token pack: 1 GiB per
# row; a 3b image row of 8,192 patches: 4 GiB per image).
QUERY_BLOCK = 1024


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segments: Segments, impl: str, block: int = QUERY_BLOCK
) -> jax.Array:
    """Softmax attention with grouped kv heads.

    q [B, T, N, H], k/v [B, S, K, H], segments (q [B, T], kv [B, S]) -> [B, T, N, H].
    `impl`: "splash" / "flash" are the fused Pallas kernels of `fused_attention` (TPU / GPU),
    which take the segment ids as they are; the others build the dense mask. "xla" / "cudnn"
    go through jax.nn.dot_product_attention (cuDNN flash attention on GPUs with "cudnn");
    "einsum" is the explicit path below. Logits and softmax are fp32.
    Past `block` queries (xla, einsum) the queries go block by block, each block's mask built
    and its scores recomputed in the backward pass: the same numbers, each query's softmax
    spans all its keys.
    """
    if impl in fused_attention.IMPLS:
        return fused_attention.attention(q, k, v, segments.q, segments.kv, segments.causal, impl)
    if q.shape[1] <= block or impl == "cudnn":
        return _attention(q, k, v, segments.mask(), impl)
    b, t, n, h = q.shape
    blocks = -(-t // block)
    pad = blocks * block - t  # padded queries (segment -1: they see no key) are dropped
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, blocks, block, n, h).swapaxes(0, 1)
    q_seg = jnp.pad(segments.q, ((0, 0), (0, pad)), constant_values=-1).reshape(b, blocks, block).swapaxes(0, 1)
    starts = jnp.arange(blocks) * block

    def one(args):
        qb, q_segb, start = args  # [B, block, N, H], [B, block], the block's first query
        return _attention(qb, k, v, Segments(q_segb, segments.kv, segments.causal).mask(start), impl)

    out = jax.lax.map(jax.checkpoint(one), (q, q_seg, starts))  # [blocks, B, block, N, H]
    return out.swapaxes(0, 1).reshape(b, blocks * block, n, h)[:, :t]


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str) -> jax.Array:
    """`attention` over all queries at once, mask [B, 1, T, S]."""
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None if impl == "xla" else "cudnn")
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * (h**-0.5)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


@struct.dataclass
class Live:
    """Each row's live cache entries, [start, end) [B]: what a one-token decode step reads."""

    start: jax.Array
    end: jax.Array
