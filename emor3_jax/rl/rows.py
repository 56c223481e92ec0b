"""The rows GRPO trains on, built from one step's rollouts on the host: prompt + response as
model inputs (bucketed or packed), and the rewards scored in a thread pool while the device
computes log-probs (`score_async`). Nothing here imports the data readers or transformers.

Letters: B prompts, n samples per prompt, R = B * n rows, P prompt bucket, G response bucket,
L pack length.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from emor3_jax.core.batches import PackedBatch, Prompt, SequenceBatch, bucket, prompt_images
from emor3_jax.models.api import prepare_inputs
from emor3_jax.rl import packing
from emor3_jax.sampling.rollout import Rollouts


def score_async(
    pool: ThreadPoolExecutor, ro: Rollouts, score: Callable[..., dict], rows: slice = slice(None)
) -> list[Future]:
    """One future per row of `rows` (this process's rows) resolving to
    score(response, label, text_answer, image_answer): the reward's named components."""
    labels = ro.labels
    futures = []
    for i in range(len(ro.responses))[rows]:
        answers = (ro.text_answers[i], ro.image_answers[i]) if ro.text_answers is not None else (None, None)
        futures.append(pool.submit(score, ro.responses[i], labels[i], *answers))
    return futures


def training_rows(
    ro: Rollouts, cfg, pad_id: int, prompt_buckets, rows: np.ndarray
) -> tuple[SequenceBatch, np.ndarray, int, int]:
    """Rows `rows` as prompt (left-padded to P) + response (G): the model inputs, the response
    mask [len(rows), G], and (P, G). Response token j sits at position P + j."""
    p_len = bucket(max(len(p.ids) for p in ro.prompts), prompt_buckets, "prompt length")
    g_len = ro.tokens.shape[1]
    ids = np.full((len(rows), p_len + g_len), pad_id, np.int64)
    attn = np.zeros((len(rows), p_len + g_len), np.int64)
    resp_mask = (np.arange(g_len)[None, :] < ro.lengths[rows, None]).astype(np.float32)
    srcs = [ro.prompts[row // ro.n] for row in rows]
    for i, (row, src) in enumerate(zip(rows, srcs)):
        ids[i, p_len - len(src.ids) : p_len] = src.ids
        attn[i, p_len - len(src.ids) : p_len] = 1
        ids[i, p_len:] = ro.tokens[row]
        attn[i, p_len:] = resp_mask[i]
    return SequenceBatch.from_inputs(_inputs(cfg, ids, attn, srcs)), resp_mask, p_len, g_len


def _inputs(cfg, ids, attn, srcs: list[Prompt]) -> dict:
    """prepare_inputs of rows ids [m, T] whose prompts are `srcs`, their images in row order
    (each prompt's images encoded once for all its rows)."""
    pixels, grids, image_index = prompt_images(srcs)
    return prepare_inputs(cfg, ids, attn, pixels, grids, image_index=image_index)


def packed_rows(
    ro: Rollouts, cfg, pad_id: int, pack_length: int, shards: int, rows: np.ndarray
) -> tuple[PackedBatch, np.ndarray]:
    """Rows `rows` as prompt + response (its `lengths` tokens, no bucket padding) packed into
    sequences of `pack_length` tokens, balanced over `shards` data-parallel shards
    (packing.plan), and the response mask [len(rows), G].

    Each row keeps the positions and image features it has on its own: the rows are first laid
    out one per line in pack order, so `prepare_inputs` computes every row's M-RoPE positions
    and puts the images in the order the packs read them, then each line is copied into its
    pack as one segment.
    """
    g_len = ro.tokens.shape[1]
    srcs = [ro.prompts[row // ro.n] for row in rows]
    resp = [int(ro.lengths[row]) for row in rows]
    lens = [len(src.ids) + n for src, n in zip(srcs, resp)]
    if max(lens) > pack_length:
        raise ValueError(
            f"a row of {max(lens)} tokens (prompt + response) does not fit --config.rl.pack_length={pack_length}; "
            "it must be >= rl.max_prompt_len + rl.max_response_len"
        )
    packs = packing.plan(lens, pack_length, shards)
    order = [i for pack in packs for i in pack]
    ids = np.full((len(rows), max(lens)), pad_id, np.int64)
    attn = np.zeros_like(ids)
    for line, i in enumerate(order):
        ids[line, : lens[i]] = np.concatenate([srcs[i].ids, ro.tokens[rows[i], : resp[i]]])
        attn[line, : lens[i]] = 1
    lines = _inputs(cfg, ids, attn, [srcs[i] for i in order])
    shape = (len(packs), pack_length)
    p_ids, seg, pos = np.full(shape, pad_id, np.int32), np.zeros(shape, np.int32), np.zeros((3, *shape), np.int32)
    width = packing.score_width(max(sum(resp[i] for i in pack) for pack in packs), pack_length)
    scored = np.zeros((len(packs), width), np.int32)
    index = np.zeros((len(rows), g_len), np.int32)
    line = 0
    for p, pack in enumerate(packs):
        start, k = 0, 0
        for s, i in enumerate(pack, 1):
            n, end = lens[i], start + lens[i]
            p_ids[p, start:end] = lines["input_ids"][line, :n]
            pos[:, p, start:end] = lines["positions"][:, line, :n]
            seg[p, start:end] = s
            # response token j sits at start + len(prompt) + j, predicted from the token before
            scored[p, k : k + resp[i]] = start + len(srcs[i].ids) - 1 + np.arange(resp[i])
            index[i, : resp[i]] = p * width + k + np.arange(resp[i])
            start, k, line = end, k + resp[i], line + 1
    batch = SequenceBatch(
        p_ids, (seg > 0).astype(np.int32), pos, lines.get("pixels"), lines.get("layout"), segment_ids=seg
    )
    resp_mask = (np.arange(g_len)[None, :] < np.asarray(resp)[:, None]).astype(np.float32)
    return PackedBatch(batch, scored, index), resp_mask
