"""On-device sampling with continuous batching: a fixed number of decode slots, refilled
inside one jitted loop as rows stop.

Letters: B prompts, n samples per prompt, R = B * n rows, Q prompts per prefill group,
W slots (decode rows at once), P prompt bucket, G generation bucket, S >= P + G cache entries
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
step count. A slot's cache row holds its prompt at entries [P - prompt length, P) and its j-th
token at entry P + j: its live entries are one contiguous span, the only part decode attention
reads (`Live`). Each row draws its j-th token with key (key, row, j), so its tokens do
not depend on the slot or the step it ran in. The first token of every row is drawn once per
group from the prefill logits, so admission moves a token id, not a row of logits: the loop
carries no [W, V] array. Admission runs after every step; with no slot free it takes no
row and copies no cache, so it costs a few [W] operations.

The KV cache [W, S] is set by the slot count, allocated once per shape and donated to each
decode call. Paged (`page_size`, sampling/pages.py), it is a pool of pages instead: a prompt's
n rows share its pages, a row's tokens take pages as they go, and admission also waits for
the pages a row may need. Shapes come from the buckets and settings, so a run compiles a
bounded number of programs (`Sampler.compiled_programs`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from emor3_jax.core import sharding
from emor3_jax.core.batches import Prompt, bucket, prompt_images
from emor3_jax.models.api import (
    KV_DTYPES,
    Cache,
    Live,
    Model,
    Segments,
    cache_length,
    empty_cache,
    prepare_inputs,
    write_slot,
)
from emor3_jax.sampling import pages
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
    prompts per prefill group (group_prompts), the groups, W decode slots, R_out output rows,
    S >= P + G cache entries per slot (rounded up to what the decode kernel reads in; paged:
    whole pages, A = P / page for the prompt and ceil(G / page) for the tokens)."""

    p_len: int
    g_len: int
    group_prompts: int
    groups: int
    slots: int
    out_rows: int
    entries: int
    page: int = 0  # paged: entries per page (0: each slot's cache is one contiguous row)
    prompt_pages: int = 0  # paged: A, the pages a prompt fills
    pages: int = 0  # paged: the pool's pages, over all shards (spares not counted)


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


@dataclasses.dataclass(frozen=True)
class Settings:
    """A decode program's static settings: n samples per prompt, how tokens are picked,
    whether a free slot takes a waiting row at once (continuous) or only once all are free."""

    n: int
    params: SamplingParams
    continuous: bool


@struct.dataclass
class Slots:
    """The decode slots, each [W]. row: the output row held (-1: free); step: tokens that row
    has emitted; pos: the M-RoPE position of its token 0; limit: its max new tokens; start: its
    first live cache entry (P - prompt length); token / logp: its next token, drawn and not yet
    emitted, and that token's log-prob."""

    row: jax.Array
    step: jax.Array
    pos: jax.Array
    limit: jax.Array
    start: jax.Array
    token: jax.Array
    logp: jax.Array


@struct.dataclass
class Outputs:
    """By output row [R_out]: tokens / logprobs [R_out, G] (see `Samples`), lengths, done, and
    where the row ran: slot, and start (the decode step at which it took the slot)."""

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    done: jax.Array
    slot: jax.Array
    start: jax.Array


@struct.dataclass
class Carry:
    """What the decode loop carries from call to call, besides the KV cache."""

    slots: Slots
    out: Outputs
    step: jax.Array  # decode steps so far


@struct.dataclass
class Prefilled:
    """A prefill group of Q prompts: logits [Q, V] of each one's next token, its cache
    [Y, Q, P, K, H] (keys and values), start [Q] (its first live entry) and pos [Q] (the
    M-RoPE position after it)."""

    logits: jax.Array
    cache: Cache
    start: jax.Array
    pos: jax.Array


@struct.dataclass
class GroupRows:
    """The group's Q * n rows: row i (prompt i // n) is output row row0 + i; the first `valid`
    are real (the rest pad the last group and never take a slot); limit [Q * n] their max new
    tokens; final: the last group, decoded until every slot is free."""

    limit: jax.Array
    row0: jax.Array
    valid: jax.Array
    final: jax.Array


@struct.dataclass
class Draw:
    """How tokens are drawn and where rows stop: stop ids [E], logit bias [V] (added before
    each draw, not to the log-probs), the call's key, the pad id written by free slots."""

    stops: jax.Array
    bias: jax.Array
    key: jax.Array
    pad_id: jax.Array


@struct.dataclass
class Waiting:
    """The group's rows in the order they take slots: first token / logp [Q * n] (drawn once
    from the prefill logits), prompt [Q * n] (which prompt of the group)."""

    token: jax.Array
    logp: jax.Array
    prompt: jax.Array


def draw(
    raw: jax.Array, rows: jax.Array, steps: jax.Array, d: Draw, params: SamplingParams
) -> tuple[jax.Array, jax.Array]:
    """Token j of row r for each (r, j) in rows / steps [M] from logits raw [M, V], drawn with
    key fold_in(fold_in(key, r), j) and the bias; -> token [M] and its unbiased log-prob [M]."""
    keys = jax.vmap(lambda r, j: jax.random.fold_in(jax.random.fold_in(d.key, r), j))(rows, steps)
    tok = select(raw + d.bias, keys, params)
    logp = jnp.take_along_axis(raw, tok[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(raw, axis=-1)
    return tok, logp


def waiting_rows(s: Settings, pre: Prefilled, rows: GroupRows, d: Draw) -> Waiting:
    """Each row's first token, drawn from its prompt's prefill logits: one [Q * n, V] gather
    per group, outside the decode loop."""
    i = jnp.arange(rows.limit.shape[0], dtype=jnp.int32)
    prompt = i // s.n
    token, logp = draw(pre.logits[prompt], rows.row0 + i, jnp.zeros_like(i), d, s.params)
    return Waiting(token, logp, prompt)


def fresh(slots: int, out_rows: int, g_len: int, pad_id: int) -> Carry:
    """Free slots and empty outputs for one `generate` (W slots, R_out output rows)."""
    batch = lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
    i32 = lambda shape, value: batch(jnp.full(shape, value, jnp.int32))
    zeros = lambda shape: batch(jnp.zeros(shape, jnp.float32))
    w, r = slots, out_rows
    return Carry(
        slots=Slots(
            row=i32((w,), -1),
            step=i32((w,), 0),
            pos=i32((w,), 0),
            limit=i32((w,), 0),
            start=i32((w,), 0),
            token=i32((w,), pad_id),
            logp=zeros((w,)),
        ),
        out=Outputs(
            tokens=i32((r, g_len), pad_id),
            logprobs=zeros((r, g_len)),
            lengths=i32((r,), 0),
            done=batch(jnp.zeros((r,), bool)),
            slot=i32((r,), -1),
            start=i32((r,), -1),
        ),
        step=jnp.zeros((), jnp.int32),
    )


def admit(s: Settings, c: Carry, cache: Cache | pages.Pages, pending, pre: Prefilled, rows: GroupRows, wait: Waiting):
    """Waiting rows take free slots in row order (all at once when not continuous): a slot
    gets its row's first token and settings, and its prompt's cache at entries [0, P) (paged:
    its prompt's pages, copied once per shard; a row waits while its shard lacks pages).
    pending: the group's rows already admitted. -> (carry, cache, pending)."""
    sl = c.slots
    out_rows = c.out.tokens.shape[0]
    free = sl.row < 0
    rank = jnp.cumsum(free) - 1
    take = free & (rank < rows.valid - pending)
    if not s.continuous:
        take &= jnp.all(free)
    src = jnp.where(take, pending + rank, 0)  # the group row each taking slot gets
    b = wait.prompt[src]  # its prompt: the fork to n samples
    if isinstance(cache, pages.Pages):  # only rows whose pages the pool can promise
        take = pages.fits(cache, take, b, rows.limit[src])
        last = src == jnp.minimum(rows.valid, (b + 1) * s.n) - 1  # its prompt's last row
        cache = pages.seat(cache, take, b, rows.limit[src], last, pre.cache)
    else:
        cache = _copy_prompts(cache, take, b, pre.cache)
    row = jnp.where(take, rows.row0 + src, out_rows)  # out_rows: dropped by the scatters
    pick = lambda new, old: jnp.where(take, new, old)
    slots = Slots(
        row=pick(rows.row0 + src, sl.row),
        step=pick(0, sl.step),
        pos=pick(pre.pos[b], sl.pos),
        limit=pick(rows.limit[src], sl.limit),
        start=pick(pre.start[b], sl.start),
        token=pick(wait.token[src], sl.token),
        logp=pick(wait.logp[src], sl.logp),
    )
    out = c.out.replace(
        slot=c.out.slot.at[row].set(jnp.arange(take.shape[0], dtype=jnp.int32), mode="drop"),
        start=c.out.start.at[row].set(c.step, mode="drop"),
    )
    return c.replace(slots=slots, out=out), cache, pending + jnp.sum(take)


def _copy_prompts(cache: Cache, take: jax.Array, b: jax.Array, pre: Cache) -> Cache:
    """Each taking slot of take [W] gets its prompt b [W]'s prefill cache (every layer) at
    entries [0, P), one slot at a time (`write_slot`): the cost follows the rows admitted, not W."""
    order = jnp.nonzero(take, size=take.shape[0], fill_value=0)[0]
    copy = lambda i, kv: write_slot(kv, pre, order[i], b[order[i]])
    return jax.lax.fori_loop(0, jnp.sum(take), copy, cache)


def step(
    s: Settings, model, c: Carry, cache: Cache | pages.Pages, p_len: int, d: Draw
) -> tuple[Carry, Cache | pages.Pages]:
    """One decode step: every busy slot emits its next token, writes it to its cache row at
    entry P + j, reads its live span, and draws the token after; a slot whose token is a stop
    id or whose row reached its limit is freed."""
    sl, out = c.slots, c.out
    w, g_len, out_rows = sl.row.shape[0], out.tokens.shape[1], out.tokens.shape[0]
    live, j = sl.row >= 0, sl.step
    tok = jnp.where(live, sl.token, d.pad_id)
    hit = live & jnp.isin(tok, d.stops)
    row = jnp.where(live, sl.row, out_rows)  # out_rows: free slots write nothing
    out = out.replace(
        tokens=out.tokens.at[row, j].set(tok, mode="drop"),
        logprobs=out.logprobs.at[row, j].set(sl.logp, mode="drop"),
        lengths=out.lengths.at[row].set(j + 1, mode="drop"),
        done=out.done.at[row].set(hit, mode="drop"),
    )
    entry = p_len + jnp.minimum(j, g_len - 1)  # a free slot writes its own dead row (paged: the spare page)
    positions = jnp.broadcast_to((sl.pos + j)[None, :, None], (3, w, 1))
    span = Live(start=sl.start, end=entry + 1)
    paged = isinstance(cache, pages.Pages)
    if paged:  # a token that starts a page takes a fresh one
        cache = pages.grow(cache, live & (entry % cache.cache.page == 0), entry // cache.cache.page)
    h, kv = model.decode(model.embed(tok[:, None]), positions, span, cache.cache if paged else cache, entry)
    token, logp = draw(model.logits(h[:, -1]), sl.row, j + 1, d, s.params)
    ended = live & (hit | (j + 1 >= sl.limit))
    slots = sl.replace(row=jnp.where(ended, -1, sl.row), step=j + live, token=token, logp=logp)
    cache = pages.release(cache.replace(cache=kv), ended) if paged else kv
    return Carry(slots, out, c.step + 1), cache


class Sampler:
    """Samples continuations of prompts with a model's current parameters.

    prompt_buckets / gen_buckets: allowed prompt lengths P and generation lengths G.
    pad_id: written after a row stops (never attended to).
    max_rows: decode slots W, i.e. the rows the KV cache holds at once (0: one slot per row).
    Prompts are prefilled in groups of max_rows // n; a row that stops hands its slot to the
    next waiting row (the rollout cache decides whether a model fits; see dry_run.py).
    prefill_group: at most this many prompts per prefill group (0: max_rows // n). A group's
    prompt cache [Y, Q, P, K, H] is gathered whole onto every device while its rows take
    slots, so one-row prompts (n = 1: reflections, evaluation) need a smaller group than
    max_rows // n allows (3b, 256 image reflections of 4,096 tokens: 35 GiB per v6e chip).
    continuous: False refills slots only once all of them are free, i.e. decodes in chunks
    that each run until their longest row stops (the reference bench/sampling.py compares).
    stop_ids: a row stops after sampling one of them; logit_bias: {token id: value} added to
    the logits before each draw (-inf: never sampled). The run-time factory sets both for every
    generation of a run; `with_stops` gives a sampler that stops elsewhere.
    kv_cache_dtype: "" (the compute dtype) or "int8" (kv_cache.py: int8 keys and values with a
    scale per entry and kv head, quantized as written: about half the cache's memory).
    page_size: 0, each slot's cache one contiguous row of S entries; else the cache is a pool
    of pages of this many entries (sampling/pages.py; every prompt bucket whole pages): the n
    rows of a prompt share its pages, a row's tokens take pages as they need them, a stopped
    row's pages go back to the pool.
    kv_pages: at most this many pages in the pool (over all shards of the slots); 0, and for a
    call that needs fewer: as many as no row ever waits for (every slot's pages plus one
    prompt's). Fewer save memory: a row then waits until its shard can promise all the pages
    it may need.
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
        prefill_group: int = 0,
        continuous: bool = True,
        kv_cache_dtype: str = "",
        page_size: int = 0,
        kv_pages: int = 0,
    ):
        if page_size < 0 or kv_pages < 0:
            raise ValueError(f"page_size and kv_pages must be >= 0 (0: off / as needed), got {page_size}, {kv_pages}")
        if kv_pages and not page_size:
            raise ValueError(f"kv_pages={kv_pages} sizes a paged cache: set page_size too")
        if kv_cache_dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: expected one of {KV_DTYPES}")
        if max_rows < 0:
            raise ValueError(f"max_rows must be >= 0 (0: one slot per row), got {max_rows}")
        if prefill_group < 0:
            raise ValueError(f"prefill_group must be >= 0 (0: max_rows // n prompts), got {prefill_group}")
        self.cfg, self.max_rows, self.prefill_group, self.continuous = cfg, max_rows, prefill_group, continuous
        self.prompt_buckets, self.gen_buckets = tuple(prompt_buckets), tuple(gen_buckets)
        self.pad_id, self.rules, self.kv_cache_dtype = pad_id, rules, kv_cache_dtype
        self.stop_ids, self.logit_bias = tuple(stop_ids), dict(logit_bias or {})
        self.page_size, self.kv_pages = page_size, kv_pages
        self.last_schedule: Schedule | None = None
        traces = self._traces = [0]  # a list: `with_stops` copies count into the same one

        def traced(fn):  # every trace is one compiled program
            def run(*args):
                traces[0] += 1
                return fn(*args)

            return run

        self._prefill = jax.jit(traced(functools.partial(_prefill, kv_dtype=kv_cache_dtype)), static_argnums=(0,))
        self._decode = jax.jit(traced(_decode), static_argnums=(0, 1), donate_argnums=(3, 4))
        self._fresh = jax.jit(fresh, static_argnums=(0, 1, 2, 3))
        self._empty = jax.jit(empty_cache, static_argnums=(0, 1, 2, 3, 4))
        self._empty_pages = jax.jit(pages.empty, static_argnums=tuple(range(9)))
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
        bias = np.zeros((self.cfg.text.vocab_size,), np.float32)
        for tok, value in self.logit_bias.items():
            bias[tok] = value
        stops = jnp.asarray(list(self.stop_ids) or [-1], jnp.int32)
        d = Draw(stops, jnp.asarray(bias), key, jnp.asarray(self.pad_id, jnp.int32))
        settings = Settings(n, params, self.continuous)
        graphdef, state = nnx.split(model)
        mesh = jax.tree.leaves(state)[0].sharding.mesh
        with sharding.use_mesh(mesh, self.rules):
            lay = self._layout(prompts, n, max_new_tokens)  # paged: under the mesh, which splits the pool
            q = lay.group_prompts
            carry = self._fresh(lay.slots, lay.out_rows, lay.g_len, self.pad_id)
            cache = None
            for g in range(lay.groups):
                chunk = list(prompts[g * q : (g + 1) * q])
                batch = left_padded_batch(self.cfg, chunk + [chunk[0]] * (q - len(chunk)), lay.p_len, self.pad_id)
                pre = self._prefill(graphdef, state, batch)
                if g:  # the previous group's decode done: at most two groups' prompt caches exist
                    jax.block_until_ready(carry)
                if cache is None:  # allocated per call and freed with it: not held through the update
                    cache = self._empty_cache(lay)
                valid = len(chunk) * n
                group_limits = np.ones((q * n,), np.int32)
                group_limits[:valid] = limits[g * q * n : g * q * n + valid]
                rows_ = GroupRows(group_limits, np.int32(g * q * n), np.int32(valid), np.bool_(g == lay.groups - 1))
                cache, carry = self._decode(graphdef, settings, state, cache, carry, pre, rows_, d)
        self.last_cache = (lay.slots, lay.entries)
        out = carry.out
        self.last_schedule = Schedule(slot=out.slot[:rows], start=out.start[:rows], steps=carry.step)
        return Samples(out.tokens[:rows], out.logprobs[:rows], out.lengths[:rows], out.done[:rows])

    def _empty_cache(self, lay: Layout) -> Cache | pages.Pages:
        """The decode cache of one `generate` call (under its mesh)."""
        dtype, kv = self.cfg.compute_dtype, self.kv_cache_dtype
        if not lay.page:
            return self._empty(self.cfg.text, lay.slots, lay.entries, dtype, kv)
        shards = sharding.axis_shards("batch")
        if lay.pages % shards:
            raise ValueError(
                f"kv_pages={lay.pages}: a paged cache splits its pages over the {shards} shards of the mesh's batch "
                "axis, so they must divide evenly"
            )
        group, columns = (lay.group_prompts, lay.prompt_pages), lay.entries // lay.page
        per_shard = lay.pages // shards
        return self._empty_pages(self.cfg.text, lay.slots, shards, per_shard, lay.page, columns, group, dtype, kv)

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
        q = min(q, self.prefill_group) if self.prefill_group else q
        groups = -(-num_prompts // q)
        slots = min(self.max_rows, rows) if self.max_rows else rows
        out_rows = q * n * (1 << (groups - 1).bit_length())  # groups rounded up to a power of two: few programs
        if not self.page_size:
            entries = cache_length(self.cfg.attention_impl, p_len + g_len)
            return Layout(p_len, g_len, q, groups, slots, out_rows, entries)
        page, shards = self.page_size, sharding.axis_shards("batch")
        if p_len % page:
            raise ValueError(
                f"page_size={page}: a prompt bucket must be whole pages (its rows share them), got bucket {p_len}"
            )
        a, own = p_len // page, -(-g_len // page)
        slots = -(-slots // shards) * shards  # each shard its own slots and pages: spare slots stay free
        roomy = shards * ((slots // shards) * (a + own) + a)  # no row ever waits
        pool = min(self.kv_pages, roomy) if self.kv_pages else roomy
        if pool // shards < a + own:
            raise ValueError(
                f"kv_pages={self.kv_pages}: each of the {shards} shards needs at least the {a + own} pages of one row "
                f"(a {p_len}-entry prompt and {g_len} tokens in pages of {page}), {shards * (a + own)} in all"
            )
        return Layout(p_len, g_len, q, groups, slots, out_rows, (a + own) * page, page, a, pool)


def _prefill(graphdef, state, batch, kv_dtype: str) -> Prefilled:
    """Vision tower + Q left-padded prompts [Q, P] -> `Prefilled`, its cache stored as
    kv_dtype says (`Sampler`)."""
    model = nnx.merge(graphdef, state)
    t = model.cfg.text
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, p = ids.shape
    x = model.embed(ids, batch.get("pixels"), batch.get("layout"))
    cache = empty_cache(t, b, p, x.dtype, kv_dtype)
    seg = mask.astype(jnp.int32)  # left padding: segment 0, the prompt: 1
    h, cache = model.decode(x, batch["positions"], Segments(seg, seg, causal=True), cache, 0)
    return Prefilled(model.logits(h[:, -1]), cache, p - mask.sum(1).astype(jnp.int32), batch["next_pos"])


def _decode(graphdef, s: Settings, state, cache: Cache, carry: Carry, pre: Prefilled, rows: GroupRows, d: Draw):
    """Decodes until the group's `valid` rows have all taken slots and a slot is free; the
    last group (`final`) until every slot is free. cache [Y, W, S, K, H] (keys and values)
    and carry are donated; -> (cache, carry)."""
    model = nnx.merge(graphdef, state)
    p_len = pre.cache.keys.shape[2]  # [Y, Q, P, K, H]
    if isinstance(cache, pages.Pages):
        cache = pages.new_group(cache)
    wait = waiting_rows(s, pre, rows, d)

    def cond(loop):
        # A free slot with no row of this group left: return, so the next group's rows take it
        # before the next step. The last group: until every row has stopped.
        c, _, pending = loop
        busy = c.slots.row >= 0
        return (pending < rows.valid) | jnp.where(rows.final, jnp.any(busy), jnp.all(busy))

    def body(loop):
        c, cache, pending = loop
        c, cache = step(s, model, c, cache, p_len, d)
        return admit(s, c, cache, pending, pre, rows, wait)

    carry, cache, _ = jax.lax.while_loop(cond, body, admit(s, carry, cache, jnp.zeros((), jnp.int32), pre, rows, wait))
    return cache, carry
