"""The paged decode cache's bookkeeping: which pool page holds which slot's entries, who still
needs each page, and which waiting rows the pool has room for.

Letters: W slots, D shards of the slots (the mesh's "batch" split), L pages per shard (each
shard also has a spare page, local id L), M table columns per slot, A prompt pages, Q prompts
of the group.

A slot's entries [0, P) hold its prompt as the prefill wrote it (left-padded to P, a whole
number A of pages), entry P + j its j-th token. Slot w lives on
shard d = w // (W / D) and names only pages of shard d, by local id (the pool's page
d * (L + 1) + id), so each device writes and reads its own block of the pool.

Who holds a page (refs, per shard and local id; a page is free at 0):
- a prompt's pages on a shard are copied there when its first row is seated on that shard.
  Each seated row holds them, and a pin holds them until the prompt's last row is seated
  (rows are seated in order, so all of a prompt's rows are seated before the next prompt's);
- a slot's tokens take a fresh page each time they reach a new one, held by that slot;
- the spare takes every write of a free slot and fills every unused table column; its ref is
  1 forever.
A row is seated only if its shard can still give it every page it may need (its prompt's if
they are not there yet, and ceil(limit / page) for its tokens); `owed` keeps the tokens' pages
promised, so a seated row never waits for a page. A row that does not fit holds back the rows
after it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from emor3_jax.core import sharding
from emor3_jax.models.api import Cache, PagedCache, empty_cache, write_pages


@struct.dataclass
class Pages:
    """cache: the pool [Y, D * (L + 1), page, ...] and table [W, M] (local ids); refs [D, L + 1]
    int32: holders of each page; owed [W] int32: pages each slot's tokens may still take;
    prompt [Q, D, A] int32: the group's prompts' pages on each shard (-1: not there)."""

    cache: PagedCache
    refs: jax.Array
    owed: jax.Array
    prompt: jax.Array


def empty(text_cfg, slots: int, shards: int, per_shard: int, page: int, columns: int, group: tuple, dtype, kv_dtype):
    """A pool of `per_shard` pages (+ a spare) on each of `shards` shards for `slots` slots of
    `columns` pages each, every page free; group: (Q prompts, A pages each)."""
    pool = empty_cache(text_cfg, shards * (per_shard + 1), page, dtype, kv_dtype)
    rows = lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
    return Pages(
        cache=PagedCache(pool, rows(jnp.full((slots, columns), per_shard, jnp.int32))),
        refs=jnp.zeros((shards, per_shard + 1), jnp.int32).at[:, per_shard].set(1),
        owed=rows(jnp.zeros((slots,), jnp.int32)),
        prompt=jnp.full((group[0], shards, group[1]), -1, jnp.int32),
    )


def new_group(p: Pages) -> Pages:
    """A new prefill group: none of its prompts is in the pool yet."""
    return p.replace(prompt=jnp.full_like(p.prompt, -1))


def _shard(p: Pages) -> jax.Array:
    """The shard of each slot [W]."""
    w, d = p.owed.shape[0], p.refs.shape[0]
    return jnp.arange(w) // (w // d)


def _spare(p: Pages) -> int:
    return p.refs.shape[1] - 1


def _per_shard_rank(mask: jax.Array, shard: jax.Array, shards: int) -> jax.Array:
    """For each True of mask [W], how many Trues of its shard come before it; [W]."""
    one_hot = mask[:, None] & (shard[:, None] == jnp.arange(shards)[None, :])  # [W, D]
    return jnp.cumsum(one_hot, axis=0)[jnp.arange(mask.shape[0]), shard] - 1


def _new_prompts(p: Pages, take: jax.Array, b: jax.Array) -> jax.Array:
    """[W]: the taking slots whose prompt b [W] is not on their shard yet and is not brought
    there by an earlier taking slot of this admission (that slot copies it)."""
    d, w = _shard(p), take.shape[0]
    key = b * p.refs.shape[0] + d
    earlier = (key[:, None] == key[None, :]) & take[None, :] & (jnp.arange(w)[None, :] < jnp.arange(w)[:, None])
    return take & (p.prompt[b, d, 0] < 0) & ~earlier.any(axis=1)


def fits(p: Pages, take: jax.Array, b: jax.Array, limit: jax.Array) -> jax.Array:
    """take [W] (the slots about to take waiting rows, in row order), b [W] each one's prompt,
    limit [W] its row's max new tokens -> take cut at the first slot whose shard cannot give
    its row every page it may need."""
    d, shards, a = _shard(p), p.refs.shape[0], p.prompt.shape[2]
    need = jnp.where(take, -(-limit // p.cache.page) + a * _new_prompts(p, take, b), 0)
    per_shard = need[:, None] * (d[:, None] == jnp.arange(shards)[None, :])  # [W, D]
    used = jnp.cumsum(per_shard, axis=0)[jnp.arange(take.shape[0]), d]
    free = jnp.sum(p.refs == 0, axis=1) - jax.ops.segment_sum(p.owed, d, shards)  # [D]
    short = take & (used > free[d])
    return take & (jnp.cumsum(short) == 0)


def _bring(p: Pages, pre: Cache, new: jax.Array, b: jax.Array) -> Pages:
    """Copies the prompt of each `new` slot [W] (prompt b [W]) from the prefill cache pre
    [Y, Q, P, ...] to free pages of its shard, pinned (ref 1)."""
    d, a, spare = _shard(p), p.prompt.shape[2], _spare(p)
    order = jnp.nonzero(new, size=new.shape[0], fill_value=0)[0]

    def bring(i, p):
        slot = order[i]
        prompt, shard = b[slot], d[slot]
        ids = jnp.nonzero(p.refs[shard] == 0, size=a, fill_value=spare)[0]  # `fits` checked there are a
        pool = write_pages(p.cache.pool, pre, prompt, shard, ids, spare + 1)
        return p.replace(
            cache=p.cache.replace(pool=pool),
            refs=p.refs.at[shard, ids].set(1),
            prompt=p.prompt.at[prompt, shard].set(ids),
        )

    return jax.lax.fori_loop(0, jnp.sum(new), bring, p)


def seat(p: Pages, take, b, limit, last, pre: Cache) -> Pages:
    """Seats a row in each taking slot of take [W]: its prompt b [W], its limit [W]; last [W]:
    the row is its prompt's last, which unpins the prompt's pages. Prompts not yet on a slot's
    shard are copied from the prefill cache pre [Y, Q, P, ...] (P = A * page)."""
    p = _bring(p, pre, _new_prompts(p, take, b), b)
    d, spare, columns = _shard(p), _spare(p), p.cache.table.shape[1]
    own = p.prompt[b, d]  # [W, A]
    rows = jnp.concatenate([own, jnp.full((own.shape[0], columns - own.shape[1]), spare, jnp.int32)], axis=1)
    table = jnp.where(take[:, None], rows, p.cache.table)
    refs = p.refs.at[d[:, None], jnp.where(take[:, None], own, spare + 1)].add(1, mode="drop")
    # the last row of a prompt seated: its pins on every shard go
    pins = p.prompt[b]  # [W, D, A]
    unpin = jnp.where(last[:, None, None] & take[:, None, None] & (pins >= 0), pins, spare + 1)
    refs = refs.at[jnp.arange(refs.shape[0])[None, :, None], unpin].add(-1, mode="drop")
    owed = jnp.where(take, -(-limit // p.cache.page), p.owed)
    return p.replace(cache=p.cache.replace(table=table), refs=refs, owed=owed)


def grow(p: Pages, need: jax.Array, column: jax.Array) -> Pages:
    """Each slot of need [W] gets a free page of its shard at table column column [W]."""
    d, spare, shards = _shard(p), _spare(p), p.refs.shape[0]
    rank = _per_shard_rank(need, d, shards)
    free = jax.vmap(lambda r: jnp.nonzero(r == 0, size=need.shape[0], fill_value=spare)[0])(p.refs)  # [D, W]
    ids = jnp.where(need, free[d, jnp.maximum(rank, 0)], spare + 1)  # spare + 1: no page (dropped)
    slot = jnp.arange(need.shape[0])
    table = p.cache.table.at[slot, column].set(jnp.where(need, ids, p.cache.table[slot, column]))
    return p.replace(cache=p.cache.replace(table=table), refs=p.refs.at[d, ids].add(1, mode="drop"), owed=p.owed - need)


def release(p: Pages, ended: jax.Array) -> Pages:
    """The slots of ended [W] let go of their pages and promised pages."""
    d, spare = _shard(p), _spare(p)
    table = p.cache.table
    held = jnp.where(ended[:, None] & (table != spare), table, spare + 1)
    return p.replace(
        cache=p.cache.replace(table=jnp.where(ended[:, None], spare, table)),
        refs=p.refs.at[d[:, None], held].add(-1, mode="drop"),
        owed=jnp.where(ended, 0, p.owed),
    )
