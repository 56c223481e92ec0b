"""The Qwen2 text decoder: GQA attention with q/k/v biases, M-RoPE, RMSNorm, SwiGLU.

Letters: Y layers, B batch, T query length, S key length, N heads, K kv heads, H head dim,
D width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emor3_jax.core import sharding
from emor3_jax.models.qwen25_vl import layers
from emor3_jax.models.qwen25_vl.config import TextConfig
from emor3_jax.models.qwen25_vl.stack import LAYER_AXIS

# The decoder's cache, every layer stacked: keys [Y, B, K, H, S] and values [Y, B, K, S, H]
# (carried through the scan over layers; each layer writes its slice in place). In these
# layouts both decode dots reduce over a non-minor axis and stream the cache once (on CPU,
# 7x faster than keys as [B, S, K, H]).
KV = tuple[jax.Array, jax.Array]
K_CACHE_AXES = (LAYER_AXIS, "batch", "kv_heads", "head_dim", "seq")
V_CACHE_AXES = (LAYER_AXIS, "batch", "kv_heads", "seq", "head_dim")


def cache_shapes(cfg: TextConfig, rows: int, slots: int) -> tuple[tuple[tuple, tuple[int, ...]], ...]:
    """(logical axes, shape) of the keys and of the values of a cache of `rows` rows, `slots`
    entries each."""
    y, k, h = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    return (K_CACHE_AXES, (y, rows, k, h, slots)), (V_CACHE_AXES, (y, rows, k, slots, h))


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, impl: str, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.head_dim
        kw = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.q_proj = layers.Linear(d, cfg.num_heads * h, ("embed", "heads"), bias=True, **kw)
        self.k_proj = layers.Linear(d, cfg.num_kv_heads * h, ("embed", "kv_heads"), bias=True, **kw)
        self.v_proj = layers.Linear(d, cfg.num_kv_heads * h, ("embed", "kv_heads"), bias=True, **kw)
        self.o_proj = layers.Linear(cfg.num_heads * h, d, ("heads", "embed"), bias=False, **kw)
        self.head_dim, self.impl = h, impl

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        attn: layers.Segments | jax.Array,
        kv: KV | None = None,
        index: jax.Array | int = 0,
        layer: jax.Array | int = 0,
    ) -> tuple[jax.Array, KV | None]:
        """x [B, T, D], cos/sin [B, T, H] -> [B, T, D].

        `attn` says what the tokens attend to: `layers.Segments` over this call's own tokens
        (S = T: training, prefill), or a dense mask [B, 1, 1, S] over the layer's whole cache
        (decode: one token). With `kv` (every layer's cache) this call's keys and values are
        written into layer `layer` at slots index..index+T-1 and the updated cache is
        returned; a Segments call with a cache is a prefill and must start at slot 0.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, -1, self.head_dim)  # [B, T, N, H]
        k = self.k_proj(x).reshape(b, t, -1, self.head_dim)  # [B, T, K, H]
        v = self.v_proj(x).reshape(b, t, -1, self.head_dim)
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        own_tokens = isinstance(attn, layers.Segments)
        if kv is None:
            if not own_tokens:
                raise ValueError("a dense decode mask needs the KV cache it masks")
            out = layers.attention(q, k, v, attn, self.impl)
            return self.o_proj(out.reshape(b, t, -1)), None
        if own_tokens and not (isinstance(index, int) and index == 0):
            raise ValueError("a Segments call with a KV cache is a prefill and must start at slot 0")
        # Only the new tokens are written: the stacked cache is updated in place.
        k_new = jnp.transpose(k, (0, 2, 3, 1))[None].astype(kv[0].dtype)  # [1, B, K, H, T]
        v_new = jnp.swapaxes(v, 1, 2)[None].astype(kv[1].dtype)  # [1, B, K, T, H]
        k_cache = jax.lax.dynamic_update_slice(kv[0], k_new, (layer, 0, 0, 0, index))
        v_cache = jax.lax.dynamic_update_slice(kv[1], v_new, (layer, 0, 0, index, 0))
        kv = (sharding.constrain(k_cache, K_CACHE_AXES), sharding.constrain(v_cache, V_CACHE_AXES))
        if own_tokens:
            out = layers.attention(q, k, v, attn, self.impl)
        else:
            own = [jax.lax.dynamic_index_in_dim(c, layer, keepdims=False).astype(q.dtype) for c in kv]
            out = layers.decode_attention(q, *own, attn)
        return self.o_proj(out.reshape(b, t, -1)), kv


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, impl: str, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", **kw)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", **kw)
        self.self_attn = Attention(cfg, impl, compute_dtype=compute_dtype, **kw)
        self.mlp = layers.GatedMLP(
            cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), bias=False, compute_dtype=compute_dtype, **kw
        )

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        attn: layers.Segments | jax.Array,
        kv: KV | None = None,
        index: jax.Array | int = 0,
        layer: jax.Array | int = 0,
    ) -> tuple[jax.Array, KV | None]:
        """See `Attention`: `kv` holds every layer's cache, this layer's is `layer`."""
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, attn, kv, index, layer)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return sharding.constrain(x, ("batch", "seq", "embed")), kv
