"""On-device sampling: one jitted prefill per prompt, fork n ways, one jitted decode loop.

Letters: B prompts, n samples per prompt, R = B * n rows, P prompt bucket, G generation
bucket, S = P + G cache slots, L decoder layers, K kv heads, H head dim, V vocab.

Prompts are left-padded to a bucket length P, so every row writes its j-th new token at
slot P + j and its M-RoPE position is (largest prompt position + 1 + j), as transformers
does with `rope_deltas`. Prefill (vision tower + prompt) runs once per prompt; its cache
[B, P] is repeated n ways into the decode cache [R, S] inside the decode program, which
runs a `lax.while_loop` until every row has stopped or `max_new_tokens` is reached. The
cache is donated from prefill to decode. Shapes come from a few configured buckets, so a
run compiles a bounded number of programs (`Sampler.compiled_programs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from emor3_jax.batches import Prompt, bucket
from emor3_jax.models.api import K_CACHE_AXES, V_CACHE_AXES, Cache, Model, prepare_inputs
from emor3_jax.runtime import sharding
from emor3_jax.sampling.methods import SamplingParams, select


@struct.dataclass
class Samples:
    """R = B * n rows, prompt b's samples at rows b*n .. b*n+n-1.

    tokens [R, G]: generated ids, `pad_id` after the stop token.
    logprobs [R, G]: log p(token) under the unmodified policy (temperature 1, no filters, no
    logit bias), 0 after the stop.
    lengths [R]: generated tokens per row, the stop token included.
    done [R]: the row ended on a stop token (False: cut by max_new_tokens).
    """

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    done: jax.Array


def left_padded_batch(cfg, prompts: Sequence[Prompt], length: int, pad_id: int) -> dict:
    """Prompts -> `prepare_inputs` arrays, left-padded to `length`, plus `next_pos` [B]."""
    ids = np.full((len(prompts), length), pad_id, np.int64)
    mask = np.zeros((len(prompts), length), np.int64)
    for i, p in enumerate(prompts):
        n = len(p.ids)
        ids[i, length - n :] = p.ids
        mask[i, length - n :] = 1
    with_img = [p for p in prompts if p.image_grid_thw is not None]
    pixels = np.concatenate([p.pixel_values for p in with_img]) if with_img else None
    grids = np.concatenate([np.asarray(p.image_grid_thw).reshape(-1, 3) for p in with_img]) if with_img else None
    out = prepare_inputs(cfg, ids, mask, pixels, grids)
    deltas = out.pop("rope_deltas")
    out["next_pos"] = (mask.sum(1) + deltas).astype(np.int32)  # first position after the prompt
    return out


class Sampler:
    """Samples continuations of prompts with a model's current parameters.

    prompt_buckets / gen_buckets: allowed prompt lengths P and generation lengths G.
    pad_id: written after a row stops (never attended to).
    max_rows: rows decoded at once (0: all). A larger request is sampled in chunks of
    max_rows // n prompts, one after another, so the KV cache holds at most max_rows rows
    (the rollout cache is what decides whether a model fits; see dry_run.py).
    Runs on the mesh the model's parameters live on, with `rules` for activations and cache.
    """

    def __init__(
        self,
        cfg,
        *,
        prompt_buckets: Sequence[int],
        gen_buckets: Sequence[int],
        pad_id: int,
        rules=sharding.DEFAULT_RULES,
        max_rows: int = 0,
    ):
        if max_rows < 0:
            raise ValueError(f"max_rows must be >= 0 (0: all rows at once), got {max_rows}")
        self.cfg, self.max_rows = cfg, max_rows
        self.prompt_buckets, self.gen_buckets = tuple(prompt_buckets), tuple(gen_buckets)
        self.pad_id, self.rules = pad_id, rules
        self._traces = 0

        def traced(fn):  # every trace is one compiled program
            def run(*args):
                self._traces += 1
                return fn(*args)

            return run

        self._prefill = jax.jit(traced(_prefill), static_argnums=(0,))
        self._decode = jax.jit(traced(_decode), static_argnums=(0, 1, 2, 3), donate_argnums=(7,))
        self._buffers: dict[tuple, Cache] = {}

    def compiled_programs(self) -> int:
        """Prefill + decode programs compiled so far (one per shape / setting)."""
        return self._traces

    def generate(
        self,
        model: Model,
        prompts: Sequence[Prompt],
        *,
        key: jax.Array,
        max_new_tokens: int,
        n: int = 1,
        params: SamplingParams = SamplingParams(),
        stop_ids: Sequence[int] = (),
        logit_bias: dict[int, float] | None = None,
    ) -> Samples:
        """n samples for each prompt; rows b*n .. b*n+n-1 continue prompts[b].

        Past `max_rows` rows, chunk c of the prompts is sampled with key fold_in(key, c); the
        last chunk is padded with repeats of its first prompt (rows dropped), so every chunk
        runs the same programs.
        """
        if not prompts:
            raise ValueError("generate: no prompts")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        per = max(1, self.max_rows // n) if self.max_rows else len(prompts)
        if per < len(prompts):
            parts = []
            for c, i in enumerate(range(0, len(prompts), per)):
                chunk = list(prompts[i : i + per])
                out = self._generate(
                    model,
                    chunk + [chunk[0]] * (per - len(chunk)),
                    jax.random.fold_in(key, c),
                    max_new_tokens,
                    n,
                    params,
                    stop_ids,
                    logit_bias,
                )
                parts.append(jax.tree.map(lambda a, rows=len(chunk) * n: a[:rows], out))
            return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
        return self._generate(model, prompts, key, max_new_tokens, n, params, stop_ids, logit_bias)

    def _generate(self, model, prompts, key, max_new_tokens, n, params, stop_ids, logit_bias) -> Samples:
        p_len = bucket(max(len(p.ids) for p in prompts), self.prompt_buckets, "prompt length")
        g_len = bucket(max_new_tokens, self.gen_buckets, "max_new_tokens")
        batch = left_padded_batch(self.cfg, prompts, p_len, self.pad_id)
        bias = np.zeros((self.cfg.text.vocab_size,), np.float32)
        for tok, value in (logit_bias or {}).items():
            bias[tok] = value
        graphdef, state = nnx.split(model)
        mesh = jax.tree.leaves(state)[0].sharding.mesh
        with sharding.use_mesh(mesh, self.rules):
            logits, prompt_cache = self._prefill(graphdef, state, batch)
            buffer = self._buffer(len(prompts) * n, p_len + g_len, prompt_cache[0][0].dtype)
            samples, buffer = self._decode(
                graphdef,
                n,
                g_len,
                params,
                state,
                logits,
                prompt_cache,
                buffer,
                batch["attention_mask"],
                batch["next_pos"],
                jnp.asarray(max_new_tokens, jnp.int32),
                jnp.asarray(list(stop_ids) or [-1], jnp.int32),
                jnp.asarray(bias),
                key,
                jnp.asarray(self.pad_id, jnp.int32),
            )
        self._buffers[(len(prompts) * n, p_len + g_len, buffer[0][0].dtype.name)] = buffer
        return samples

    def _buffer(self, rows: int, slots: int, dtype) -> Cache:
        """The decode cache for this shape: allocated once (under the caller's mesh), donated to
        and returned by decode."""
        key = (rows, slots, jnp.dtype(dtype).name)
        if key not in self._buffers:
            t = self.cfg.text

            def alloc():
                k = sharding.constrain(jnp.zeros((rows, t.num_kv_heads, t.head_dim, slots), dtype), K_CACHE_AXES)
                v = sharding.constrain(jnp.zeros((rows, t.num_kv_heads, slots, t.head_dim), dtype), V_CACHE_AXES)
                return tuple((k, v) for _ in range(t.num_layers))

            self._buffers[key] = jax.jit(alloc)()
        return self._buffers.pop(key)


def _prefill(graphdef, state, batch) -> tuple[jax.Array, Cache]:
    """Vision tower + prompt -> logits of the next token [B, V] and the prompt cache [B, P]."""
    model = nnx.merge(graphdef, state)
    t = model.cfg.text
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, p = ids.shape
    x = model.embed(ids, batch.get("pixels"), batch.get("layout"))
    k = sharding.constrain(jnp.zeros((b, t.num_kv_heads, t.head_dim, p), x.dtype), K_CACHE_AXES)
    v = sharding.constrain(jnp.zeros((b, t.num_kv_heads, p, t.head_dim), x.dtype), V_CACHE_AXES)
    cache = tuple((k, v) for _ in range(t.num_layers))
    causal = jnp.tril(jnp.ones((p, p), bool))
    attn = (causal[None] & mask[:, None, :].astype(bool))[:, None]  # [B, 1, P, P]
    h, cache = model.decode(x, batch["positions"], attn, cache, 0)
    return model.logits(h[:, -1]), cache


def _decode(
    graphdef,
    n: int,
    g_len: int,
    params: SamplingParams,
    state,
    logits,
    prompt_cache: Cache,
    buffer: Cache,
    prompt_mask,
    next_pos,
    max_new,
    stop_ids,
    bias,
    key,
    pad_id,
) -> tuple[Samples, Cache]:
    """Forks the prompt cache [B, P] n ways into `buffer` [R, S] (donated; slots past the
    prompt hold stale values that the key mask hides) and samples up to max_new (<= G)
    tokens per row."""
    model = nnx.merge(graphdef, state)
    fork = lambda a: jnp.repeat(a, n, axis=0)
    b, p = prompt_mask.shape
    r = b * n
    cache = tuple(
        (
            jax.lax.dynamic_update_slice(bk, fork(k), (0, 0, 0, 0)),
            jax.lax.dynamic_update_slice(bv, fork(v), (0, 0, 0, 0)),
        )
        for (k, v), (bk, bv) in zip(prompt_cache, buffer)
    )
    key_mask = jnp.pad(fork(prompt_mask).astype(bool), ((0, 0), (0, g_len)))  # [R, S]
    next_pos = fork(next_pos)
    init = dict(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        logits=fork(logits),
        key_mask=key_mask,
        tokens=jnp.full((r, g_len), pad_id, jnp.int32),
        logprobs=jnp.zeros((r, g_len), jnp.float32),
        lengths=jnp.zeros((r,), jnp.int32),
        done=jnp.zeros((r,), bool),
        stopped=jnp.zeros((r,), bool),
    )

    def cond(c):
        return (c["step"] < max_new) & ~jnp.all(c["done"])

    def body(c):
        step, raw = c["step"], c["logits"]
        tok = select(raw + bias, jax.random.fold_in(key, step), params)
        logp = jnp.take_along_axis(raw, tok[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(raw, axis=-1)
        live = ~c["done"]
        tok = jnp.where(live, tok, pad_id)
        hit = live & jnp.isin(tok, stop_ids)
        slot = p + step
        key_mask = c["key_mask"].at[:, slot].set(True)
        positions = jnp.broadcast_to((next_pos + step)[None, :, None], (3, r, 1))
        x = model.embed(tok[:, None])
        h, cache = model.decode(x, positions, key_mask[:, None, None, :], c["cache"], slot)
        return dict(
            step=step + 1,
            cache=cache,
            logits=model.logits(h[:, -1]),
            key_mask=key_mask,
            tokens=c["tokens"].at[:, step].set(tok),
            logprobs=c["logprobs"].at[:, step].set(jnp.where(live, logp, 0.0)),
            lengths=c["lengths"] + live,
            done=c["done"] | hit | (step + 1 >= max_new),
            stopped=c["stopped"] | hit,
        )

    out = jax.lax.while_loop(cond, body, init)
    samples = Samples(tokens=out["tokens"], logprobs=out["logprobs"], lengths=out["lengths"], done=out["stopped"])
    return samples, out["cache"]
