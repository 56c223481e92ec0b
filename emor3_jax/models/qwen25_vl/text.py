"""The Qwen2 text decoder: GQA attention with q/k/v biases, M-RoPE, RMSNorm, SwiGLU.

Letters: Y layers, B batch, T query length, S key length, N heads, K kv heads, H head dim,
D width.
"""

from __future__ import annotations

import jax
from flax import nnx

from emor3_jax.core import sharding
from emor3_jax.models import lora
from emor3_jax.models.qwen25_vl import kv_cache, layers
from emor3_jax.models.qwen25_vl.config import TextConfig
from emor3_jax.models.qwen25_vl.kv_cache import KVCache, PagedKVCache
from emor3_jax.models.qwen25_vl.ragged_decode import cache_multiple, sharded_decode_attention

# The decode kernel of each attention impl: the fused TPU / GPU paths read only live blocks.
DECODE_IMPLS = {"xla": "xla", "einsum": "xla", "cudnn": "xla", "splash": "tpu", "flash": "gpu"}


def cache_length(attention_impl: str, entries: int) -> int:
    """A decode cache of at least `entries` entries per row, rounded up to what the decode
    kernel of `attention_impl` reads in (the extra entries are never live)."""
    multiple = cache_multiple(DECODE_IMPLS[attention_impl])
    return -(-entries // multiple) * multiple


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, impl: str, *, param_dtype, compute_dtype, rngs: nnx.Rngs, adapter=None):
        d, h = cfg.hidden_size, cfg.head_dim
        kw = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs, adapter=adapter)
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
        attn: layers.Segments | layers.Live,
        kv: KVCache | PagedKVCache | None = None,
        index: jax.Array | int = 0,
        layer: jax.Array | int = 0,
        dropout: lora.Dropout | None = None,
    ) -> tuple[jax.Array, KVCache | PagedKVCache | None]:
        """x [B, T, D], cos/sin [B, T, H] -> [B, T, D].

        `attn` says what the tokens attend to: `layers.Segments` over this call's own tokens
        (S = T: training, prefill), or `layers.Live` [B] (decode: one token per row, attending
        to its row's live cache entries). With `kv` (every layer's cache) this call's keys and
        values are written into layer `layer` and the updated cache is returned: a prefill at
        entries 0..T-1 (index must be 0), a decode token at entry index [B] of its own row
        (a `PagedKVCache`, decode only: through its page table).
        `dropout` (training): the adapters' dropout, folded with 0-3 for q, k, v, o.
        """
        b, t, _ = x.shape
        q = self.q_proj(x, lora.fold(dropout, 0)).reshape(b, t, -1, self.head_dim)  # [B, T, N, H]
        k = self.k_proj(x, lora.fold(dropout, 1)).reshape(b, t, -1, self.head_dim)  # [B, T, K, H]
        v = self.v_proj(x, lora.fold(dropout, 2)).reshape(b, t, -1, self.head_dim)
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        own_tokens = isinstance(attn, layers.Segments)
        if kv is None:
            if not own_tokens:
                raise ValueError("a decode step (Live) needs the KV cache it reads")
            out = layers.attention(q, k, v, attn, self.impl)
            return self.o_proj(out.reshape(b, t, -1), lora.fold(dropout, 3)), None
        if own_tokens:
            if not (isinstance(index, int) and index == 0):
                raise ValueError("a Segments call with a KV cache is a prefill and must start at entry 0")
            if isinstance(kv, PagedKVCache):
                raise ValueError("a prefill writes a dense KVCache; pages are filled from it (sampling/pages.py)")
            kv = kv_cache.write_prefill(kv, k, v, layer)
        else:  # each row at its own entry: one [B, K, H] scatter per layer, in place
            kv = kv_cache.write_rows(kv, k, v, layer, index)
        kv = kv_cache.constrain(kv)
        if own_tokens:
            out = layers.attention(q, k, v, attn, self.impl)
        else:
            own = kv_cache.layer(kv, layer, q.dtype)
            pages = kv.table if isinstance(kv, PagedKVCache) else None
            impl = DECODE_IMPLS[self.impl]
            out = sharded_decode_attention(q[:, 0], *own, attn.start, attn.end, impl=impl, pages=pages)[:, None]
        return self.o_proj(out.reshape(b, t, -1), lora.fold(dropout, 3)), kv


class DecoderLayer(nnx.Module):
    """`adapters`: the LoRA adapters of its attention and of its MLP (models/lora.py; None: none)."""

    def __init__(
        self, cfg: TextConfig, impl: str, *, param_dtype, compute_dtype, rngs: nnx.Rngs, adapters=(None, None)
    ):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", **kw)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", **kw)
        self.self_attn = Attention(cfg, impl, compute_dtype=compute_dtype, adapter=adapters[0], **kw)
        self.mlp = layers.GatedMLP(
            cfg.hidden_size,
            cfg.intermediate_size,
            ("embed", "mlp"),
            bias=False,
            compute_dtype=compute_dtype,
            adapter=adapters[1],
            **kw,
        )

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        attn: layers.Segments | layers.Live,
        kv: KVCache | PagedKVCache | None = None,
        index: jax.Array | int = 0,
        layer: jax.Array | int = 0,
        dropout: lora.Dropout | None = None,
    ) -> tuple[jax.Array, KVCache | PagedKVCache | None]:
        """See `Attention`: `kv` holds every layer's cache, this layer's is `layer`; `dropout`:
        this layer's (its attention and MLP fold in their projections' numbers)."""
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, attn, kv, index, layer, dropout)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), dropout)
        return sharding.constrain(x, ("batch", "seq", "embed")), kv
