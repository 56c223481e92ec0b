"""On-device sampling with continuous batching: a fixed number of decode slots, refilled
inside one jitted loop as rows stop.

Letters: B prompts, n samples per prompt, R = B * n rows, Q prompts per prefill group,
W slots (decode rows at once), P prompt bucket, G generation bucket, S = P + G cache entries
per slot, V vocab.

Prompts are left-padded to one bucket length P and prefilled once each, in groups of Q
(vision tower + prompt -> the group's prompt cache [Q, P] and next-token logits). The decode
program then runs a `lax.while_loop` over W slots: whenever a slot is free and a row of the
group is waiting, the row takes the slot (its prompt's cache copied to entries [0, P), the
fork to n samples), and every step decodes one token for every busy slot. A row stops on a
stop token or at its own limit, and its slot takes the next waiting row in the same loop. The
call returns once the group's rows are all in slots and a slot is free; the next group's call
carries the slots on and fills that slot before its first step, and the last call runs until
every slot is free.

Rows in slots differ in prompt, length and position: each slot has its own M-RoPE position
(largest prompt position + 1 + j for its j-th token, as transformers' `rope_deltas`) and
step count. Generated keys and values go to entries P + (global step mod G), shared by all
slots: attention is a masked sum over cache entries, so their order does not matter, and a
row of at most G tokens never overwrites its own. A new row's key mask hides what the
slot's previous row left there. Each row samples with keys from (key, row, token index), so
its tokens do not depend on the slot or the step it ran in.

The KV cache [W, S] is set by the slot count, allocated once per shape and donated to each
decode call. Shapes come from the buckets and settings, so a run compiles a bounded number
of programs (`Sampler.compiled_programs`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from emor3_jax.core import sharding
from emor3_jax.core.batches import Prompt, bucket, prompt_images
from emor3_jax.models.api import Cache, Model, Segments, cache_shapes, prepare_inputs
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
    pixels, grids, image_index = prompt_images(prompts)
    out = prepare_inputs(cfg, ids, mask, pixels, grids, image_index=image_index)
    deltas = out.pop("rope_deltas")
    out["next_pos"] = (mask.sum(1) + deltas).astype(np.int32)  # first position after the prompt
    return out


@struct.dataclass
class Schedule:
    """Where the rows of the last `generate` ran. slot [R]: the decode slot row r held;
    start [R]: the decode step at which it took the slot; steps: decode steps in all."""

    slot: jax.Array
    start: jax.Array
    steps: jax.Array


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one `generate` call runs: prompt bucket P (p_len), generation bucket G (g_len), Q
    prompts per prefill group (group_prompts), the groups, W decode slots, R_out output rows."""

    p_len: int
    g_len: int
    group_prompts: int
    groups: int
    slots: int
    out_rows: int


def _row_limits(rows: int, max_new_tokens: int, row_max_new: Sequence[int] | None) -> np.ndarray:
    """The new-token limit of each row [R]: row_max_new checked, else all max_new_tokens."""
    if row_max_new is None:
        return np.full((rows,), max_new_tokens, np.int32)
    limits = np.asarray(row_max_new, np.int32)
    if limits.shape != (rows,) or limits.min() < 1 or limits.max() > max_new_tokens:
        raise ValueError(
            f"row_max_new must hold {rows} limits in 1..{max_new_tokens}, got shape {limits.shape} "
            f"with values {limits.min()}..{limits.max()}"
        )
    return limits


def _first_rows(carry: dict, rows: int) -> tuple[Samples, Schedule]:
    """The outputs of the first `rows` rows of the decode carry (the rest is padding)."""
    schedule = Schedule(slot=carry["row_slot"][:rows], start=carry["row_start"][:rows], steps=carry["step"])
    samples = Samples(
        tokens=carry["tokens"][:rows],
        logprobs=carry["logprobs"][:rows],
        lengths=carry["lengths"][:rows],
        done=carry["done"][:rows],
    )
    return samples, schedule


class Sampler:
    """Samples continuations of prompts with a model's current parameters.

    prompt_buckets / gen_buckets: allowed prompt lengths P and generation lengths G.
    pad_id: written after a row stops (never attended to).
    max_rows: decode slots W, i.e. the rows the KV cache holds at once (0: one slot per row).
    Prompts are prefilled in groups of max_rows // n; a row that stops hands its slot to the
    next waiting row (the rollout cache decides whether a model fits; see dry_run.py).
    continuous: False refills slots only once all of them are free, i.e. decodes in chunks
    that each run until their longest row stops (the reference bench/sampling.py compares).
    stop_ids: a row stops after sampling one of them; logit_bias: {token id: value} added to
    the logits before each draw (-inf: never sampled). The run-time factory sets both for every
    generation of a run; `with_stops` gives a sampler that stops elsewhere.
    Runs on the mesh the model's parameters live on, with `rules` for activations and cache.
    After each `generate`, `last_schedule` says which slot ran each row and when.
    """

    def __init__(
        self,
        cfg,
        *,
        prompt_buckets: Sequence[int],
        gen_buckets: Sequence[int],
        pad_id: int,
        stop_ids: Sequence[int] = (),
        logit_bias: dict[int, float] | None = None,
        rules=sharding.DEFAULT_RULES,
        max_rows: int = 0,
        continuous: bool = True,
    ):
        if max_rows < 0:
            raise ValueError(f"max_rows must be >= 0 (0: one slot per row), got {max_rows}")
        self.cfg, self.max_rows, self.continuous = cfg, max_rows, continuous
        self.prompt_buckets, self.gen_buckets = tuple(prompt_buckets), tuple(gen_buckets)
        self.pad_id, self.rules = pad_id, rules
        self.stop_ids, self.logit_bias = tuple(stop_ids), dict(logit_bias or {})
        self.last_schedule: Schedule | None = None
        traces = self._traces = [0]  # a list: `with_stops` copies count into the same one

        def traced(fn):  # every trace is one compiled program
            def run(*args):
                traces[0] += 1
                return fn(*args)

            return run

        self._prefill = jax.jit(traced(_prefill), static_argnums=(0,))
        self._decode = jax.jit(traced(_decode), static_argnums=(0, 1, 2, 3), donate_argnums=(5, 6))
        self._fresh = jax.jit(_fresh_slots, static_argnums=(0, 1, 2, 3, 4, 5))
        self._empty = jax.jit(empty_cache, static_argnums=(0, 1, 2, 3))
        self.last_cache: tuple[int, int] | None = None  # (rows, entries) of the last call's KV cache

    def compiled_programs(self) -> int:
        """Prefill + decode programs compiled so far (one per shape / setting)."""
        return self._traces[0]

    def with_stops(self, stop_ids: Sequence[int] | None = None, logit_bias: dict[int, float] | None = None) -> Sampler:
        """This sampler with other stop ids and/or logit bias (None: keep this one's; `()` / `{}`
        clear them), for a caller that must not stop where the run's generations do (a bench
        that forces a fixed length, tests). The copy shares the compiled programs, their count
        and the cache buffers; its `last_schedule` is its own."""
        other = copy.copy(self)
        if stop_ids is not None:
            other.stop_ids = tuple(stop_ids)
        if logit_bias is not None:
            other.logit_bias = dict(logit_bias)
        return other

    def generate(
        self,
        model: Model,
        prompts: Sequence[Prompt],
        *,
        key: jax.Array,
        max_new_tokens: int,
        n: int = 1,
        params: SamplingParams = SamplingParams(),
        row_max_new: Sequence[int] | None = None,
    ) -> Samples:
        """n samples for each prompt; rows b*n .. b*n+n-1 continue prompts[b]. Rows stop at
        `stop_ids` and draw with `logit_bias` added (the sampler's own; see `with_stops`).

        row_max_new [R]: optional per-row limits in 1..max_new_tokens (default: all
        max_new_tokens). Row r draws its j-th token with key fold_in(fold_in(key, r), j),
        whichever slot and step it runs in. The last prefill group is padded with repeats of
        its first prompt, whose rows never take a slot, so every group runs the same programs.
        """
        if not prompts:
            raise ValueError("generate: no prompts")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        rows = len(prompts) * n
        limits = _row_limits(rows, max_new_tokens, row_max_new)
        lay = self._layout(prompts, n, max_new_tokens)
        bias = np.zeros((self.cfg.text.vocab_size,), np.float32)
        for tok, value in self.logit_bias.items():
            bias[tok] = value
        stops = jnp.asarray(list(self.stop_ids) or [-1], jnp.int32)
        graphdef, state = nnx.split(model)
        mesh = jax.tree.leaves(state)[0].sharding.mesh
        q = lay.group_prompts
        with sharding.use_mesh(mesh, self.rules):
            carry = self._fresh(lay.slots, lay.out_rows, lay.p_len, lay.g_len, self.cfg.text.vocab_size, self.pad_id)
            cache = None
            for g in range(lay.groups):
                chunk = list(prompts[g * q : (g + 1) * q])
                batch = left_padded_batch(self.cfg, chunk + [chunk[0]] * (q - len(chunk)), lay.p_len, self.pad_id)
                logits, prompt_cache = self._prefill(graphdef, state, batch)
                if g:  # the previous group's decode done: at most two groups' prompt caches exist
                    jax.block_until_ready(carry)
                if cache is None:  # allocated per call and freed with it: not held through the update
                    cache = self._empty(self.cfg.text, lay.slots, lay.p_len + lay.g_len, prompt_cache[0].dtype)
                valid = len(chunk) * n
                group_limits = np.ones((q * n,), np.int32)
                group_limits[:valid] = limits[g * q * n : g * q * n + valid]
                cache, carry = self._decode(
                    graphdef,
                    n,
                    params,
                    self.continuous,
                    state,
                    cache,
                    carry,
                    logits,
                    prompt_cache,
                    batch["attention_mask"],
                    batch["next_pos"],
                    group_limits,
                    np.int32(g * q * n),
                    np.int32(valid),
                    np.bool_(g == lay.groups - 1),
                    stops,
                    jnp.asarray(bias),
                    key,
                    jnp.asarray(self.pad_id, jnp.int32),
                )
        self.last_cache = (lay.slots, lay.p_len + lay.g_len)
        samples, self.last_schedule = _first_rows(carry, rows)
        return samples

    def _layout(self, prompts: Sequence[Prompt], n: int, max_new_tokens: int) -> Layout:
        """The buckets, prefill groups and slots of one `generate` call."""
        return self.layout(len(prompts), max(len(p.ids) for p in prompts), n, max_new_tokens)

    def layout(self, num_prompts: int, prompt_len: int, n: int, max_new_tokens: int) -> Layout:
        """How `generate` runs `num_prompts` prompts of up to `prompt_len` tokens, n samples each
        (also what compile_for compiles at a config's shapes)."""
        p_len = bucket(prompt_len, self.prompt_buckets, "prompt length")
        g_len = bucket(max_new_tokens, self.gen_buckets, "max_new_tokens")
        rows = num_prompts * n
        q = min(num_prompts, max(1, self.max_rows // n)) if self.max_rows else num_prompts
        groups = -(-num_prompts // q)
        slots = min(self.max_rows, rows) if self.max_rows else rows
        out_rows = q * n * (1 << (groups - 1).bit_length())  # groups rounded up to a power of two: few programs
        return Layout(p_len, g_len, q, groups, slots, out_rows)


def _fresh_slots(slots: int, out_rows: int, p_len: int, g_len: int, vocab: int, pad_id: int) -> dict:
    """Free slots and empty outputs for one `generate` (everything the decode loop carries
    between calls except the KV cache).

    Slots [W]: row (-1: free), step j (tokens generated), pos (M-RoPE position of token 0),
    limit (its max new tokens); logits [W, V] of each slot's next token; key_mask [W, S].
    Outputs, by row [R_out]: tokens / logprobs [R_out, G], lengths, done, and row_slot /
    row_start (which slot ran the row, from which step). step: decode steps so far.
    """
    w, s, r = slots, p_len + g_len, out_rows
    batch = lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
    i32 = lambda shape, value: batch(jnp.full(shape, value, jnp.int32))
    return dict(
        slot_row=i32((w,), -1),
        slot_step=i32((w,), 0),
        slot_pos=i32((w,), 0),
        slot_limit=i32((w,), 0),
        logits=batch(jnp.zeros((w, vocab), jnp.float32)),
        key_mask=batch(jnp.zeros((w, s), bool)),
        tokens=i32((r, g_len), pad_id),
        logprobs=batch(jnp.zeros((r, g_len), jnp.float32)),
        lengths=i32((r,), 0),
        done=batch(jnp.zeros((r,), bool)),
        row_slot=i32((r,), -1),
        row_start=i32((r,), -1),
        step=jnp.zeros((), jnp.int32),
    )


def empty_cache(t, rows: int, slots: int, dtype) -> Cache:
    """A zero cache (`cache_shapes`) for text config `t`, sharded by its logical axes (inside jit)."""
    return tuple(sharding.constrain(jnp.zeros(shape, dtype), axes) for axes, shape in cache_shapes(t, rows, slots))


def _prefill(graphdef, state, batch) -> tuple[jax.Array, Cache]:
    """Vision tower + prompt -> logits of the next token [Q, V] and the prompt cache [Q, P]."""
    model = nnx.merge(graphdef, state)
    t = model.cfg.text
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, p = ids.shape
    x = model.embed(ids, batch.get("pixels"), batch.get("layout"))
    cache = empty_cache(t, b, p, x.dtype)
    seg = mask.astype(jnp.int32)  # left padding: segment 0, the prompt: 1
    h, cache = model.decode(x, batch["positions"], Segments(seg, seg, causal=True), cache, 0)
    return model.logits(h[:, -1]), cache


def _decode(
    graphdef,
    n: int,
    params: SamplingParams,
    continuous: bool,
    state,
    cache: Cache,
    carry: dict,
    logits,
    prompt_cache: Cache,
    prompt_mask,
    next_pos,
    limits,
    row0,
    valid,
    final,
    stop_ids,
    bias,
    key,
    pad_id,
) -> tuple[Cache, dict]:
    """Decodes until the group's first `valid` rows have all taken slots and a slot is free;
    the last group (`final`) until every slot is free.

    cache [Y, W, .., S] and carry (`_fresh_slots`) are donated and returned. The group:
    logits [Q, V], prompt_cache [Y, Q, .., P], prompt_mask [Q, P], next_pos [Q] from its
    prefill; limits [Q * n] per row; its row i (prompt i // n) is output row row0 + i.
    """
    model = nnx.merge(graphdef, state)
    p = prompt_mask.shape[1]
    w, s = carry["key_mask"].shape
    g_len, out_rows = s - p, carry["tokens"].shape[0]
    slot_ids = jnp.arange(w, dtype=jnp.int32)

    def admit(c, cache, pending):
        """Waiting rows take free slots in row order (all at once when not continuous)."""
        free = c["slot_row"] < 0
        rank = jnp.cumsum(free) - 1
        take = free & (rank < valid - pending)
        if not continuous:
            take &= jnp.all(free)
        src = jnp.where(take, pending + rank, 0)  # the group row each taking slot gets
        b = src // n  # its prompt: the fork to n samples
        row = jnp.where(take, row0 + src, out_rows)  # out_rows: dropped by the scatters
        gen_mask = jnp.zeros((w, g_len), bool)

        # Copy each new row's prompt cache (every layer) into its slot, one slot at a time: the
        # cost follows the rows admitted, not W.
        order = jnp.nonzero(take, size=w, fill_value=0)[0]

        def copy(i, kv):
            slot, prompt = order[i], b[order[i]]
            return tuple(
                jax.lax.dynamic_update_slice(c, jax.lax.dynamic_slice_in_dim(pc, prompt, 1, axis=1), (0, slot, 0, 0, 0))
                for c, pc in zip(kv, prompt_cache)
            )

        cache = jax.lax.fori_loop(0, jnp.sum(take), copy, cache)
        c = dict(
            c,
            slot_row=jnp.where(take, row0 + src, c["slot_row"]),
            slot_step=jnp.where(take, 0, c["slot_step"]),
            slot_pos=jnp.where(take, next_pos[b], c["slot_pos"]),
            slot_limit=jnp.where(take, limits[src], c["slot_limit"]),
            logits=jnp.where(take[:, None], logits[b], c["logits"]),
            key_mask=jnp.where(
                take[:, None], jnp.concatenate([prompt_mask[b].astype(bool), gen_mask], 1), c["key_mask"]
            ),
            row_slot=c["row_slot"].at[row].set(slot_ids, mode="drop"),
            row_start=c["row_start"].at[row].set(c["step"], mode="drop"),
        )
        return c, cache, pending + jnp.sum(take)

    def cond(loop):
        # A free slot with no row of this group left: return, so the next group's rows take it
        # before the next step. The last group: until every row has stopped.
        c, _, pending = loop
        busy = c["slot_row"] >= 0
        return (pending < valid) | jnp.where(final, jnp.any(busy), jnp.all(busy))

    def body(loop):
        c, cache, pending = loop
        live, j, raw = c["slot_row"] >= 0, c["slot_step"], c["logits"]
        keys = jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(key, r), t))(c["slot_row"], j)
        tok = select(raw + bias, keys, params)
        logp = jnp.take_along_axis(raw, tok[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(raw, axis=-1)
        tok = jnp.where(live, tok, pad_id)
        hit = live & jnp.isin(tok, stop_ids)
        row = jnp.where(live, c["slot_row"], out_rows)  # out_rows: free slots write nothing
        entry = p + c["step"] % g_len  # shared by all slots; see the module docstring
        key_mask = c["key_mask"].at[:, entry].set(live)
        positions = jnp.broadcast_to((c["slot_pos"] + j)[None, :, None], (3, w, 1))
        h, cache = model.decode(model.embed(tok[:, None]), positions, key_mask[:, None, None, :], cache, entry)
        c = dict(
            c,
            slot_row=jnp.where(live & (hit | (j + 1 >= c["slot_limit"])), -1, c["slot_row"]),
            slot_step=j + live,
            logits=model.logits(h[:, -1]),
            key_mask=key_mask,
            tokens=c["tokens"].at[row, j].set(tok, mode="drop"),
            logprobs=c["logprobs"].at[row, j].set(logp, mode="drop"),
            lengths=c["lengths"].at[row].set(j + 1, mode="drop"),
            done=c["done"].at[row].set(hit, mode="drop"),
            step=c["step"] + 1,
        )
        return admit(c, cache, pending)

    loop = admit(carry, cache, jnp.zeros((), jnp.int32))
    carry, cache, _ = jax.lax.while_loop(cond, body, loop)
    return cache, carry
