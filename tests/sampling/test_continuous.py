"""Continuous batching: a few decode slots, refilled as rows stop, give the rows that one slot
per row gives (greedy tokens, log-probs, lengths), and the schedule shows slots reused without
idling. transformers parity of the one-slot-per-row path is in test_sampler.py.
"""

import jax
import numpy as np
import pytest
from qwen_fixtures import IMAGE, PATCH_DIM, VEND, VSTART

from emor3_jax.core.batches import Prompt
from emor3_jax.sampling.methods import GREEDY, SamplingParams
from emor3_jax.sampling.sampler import Sampler

PAD = 0

# Mixed prompt lengths, with and without images (one prompt with two).
SEGMENTS = ([4, (8, 12), 5], [9], [2, (4, 4), 7], [30], [3, (8, 8), 2, (4, 4), 1])
N, NEW = 2, 8


def _prompt(rng, segments):
    """segments: ints (text tokens) or (h, w) image grids in patches."""
    ids, pixels, grids = [], [], []
    for seg in segments:
        if isinstance(seg, int):
            ids += rng.integers(1, IMAGE - 10, size=seg).tolist()
        else:
            grids.append([1, *seg])
            pixels.append(rng.standard_normal((seg[0] * seg[1], PATCH_DIM)).astype(np.float32))
            ids += [VSTART] + [IMAGE] * (seg[0] * seg[1] // 4) + [VEND]
    if not grids:
        return Prompt(np.array(ids))
    return Prompt(np.array(ids), np.concatenate(pixels), np.array(grids))


def _sampler(cfg, max_rows=0, continuous=True, stop_ids=(), prefill_group=0, **kw):
    """kw: more Sampler settings (prompt_buckets: (64,) unless given)."""
    kw = {"prompt_buckets": (64,), **kw}
    return Sampler(
        cfg,
        gen_buckets=(NEW,),
        pad_id=PAD,
        stop_ids=stop_ids,
        max_rows=max_rows,
        prefill_group=prefill_group,
        continuous=continuous,
        **kw,
    )


def _host(out):
    return {k: np.asarray(getattr(out, k)) for k in ("tokens", "logprobs", "lengths", "done")}


@pytest.fixture(scope="module")
def case(ours_fp32):
    """Prompts, generate's arguments (per-row limits among them), the one-slot-per-row greedy
    result for them, and the stop ids (a stop token that ends some rows early)."""
    prompts = [_prompt(np.random.default_rng(21), segs) for segs in SEGMENTS]
    whole = _sampler(ours_fp32.cfg)
    free_run = np.asarray(
        whole.generate(ours_fp32, prompts, key=jax.random.key(0), max_new_tokens=NEW, n=N, params=GREEDY).tokens
    )
    stop = next(int(t) for t in free_run[0, 1:5] if sum(t in row for row in free_run) < len(free_run))
    limits = np.array([NEW, 3, 5, NEW, 1, 7, NEW, 2, 4, 6])
    kw = dict(key=jax.random.key(0), max_new_tokens=NEW, n=N, params=GREEDY, row_max_new=limits)
    ref = _host(whole.with_stops((stop,)).generate(ours_fp32, prompts, **kw))
    return prompts, kw, ref, (stop,)


def test_reference_rows_stop_at_both_stop_token_and_limits(case):
    _, kw, ref, _ = case
    assert ref["done"].any() and not ref["done"].all()  # some rows end on the stop token, some not
    cut = ~ref["done"]
    np.testing.assert_array_equal(ref["lengths"][cut], kw["row_max_new"][cut])  # the others at their limit
    assert (ref["lengths"] <= kw["row_max_new"]).all() and len(set(ref["lengths"])) >= 4
    for row, length in zip(ref["tokens"], ref["lengths"]):
        assert (row[length:] == PAD).all()


@pytest.mark.parametrize("max_rows, continuous, group", [(3, True, 0), (4, False, 0), (7, True, 0), (7, True, 1)])
def test_few_slots_give_the_same_greedy_rows(ours_fp32, case, max_rows, continuous, group):
    """3 slots (groups of 1 prompt), 4 slots chunked (groups of 2 prompts, the last one padded),
    7 slots (groups of 3 prompts: 6 rows, not a multiple of the slots), and 7 slots filled by
    prefill groups of 1 prompt (sampling.prefill_group)."""
    prompts, kw, ref, stops = case
    s = _sampler(ours_fp32.cfg, max_rows, continuous, stops, group)
    assert s.layout(len(prompts), 64, N, NEW).group_prompts == (group or max_rows // N)
    out = _host(s.generate(ours_fp32, prompts, **kw))
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    np.testing.assert_array_equal(out["lengths"], ref["lengths"])
    np.testing.assert_array_equal(out["done"], ref["done"])
    np.testing.assert_allclose(out["logprobs"], ref["logprobs"], atol=1e-5)
    assert s.last_cache[0] == max_rows  # the KV cache holds max_rows rows


def _slot_runs(sampler, lengths):
    """slot -> [(start, end, row)] in start order, from the last generate's schedule."""
    sched = sampler.last_schedule
    slot, start = np.asarray(sched.slot), np.asarray(sched.start)
    runs = {}
    for row, (s, t0) in enumerate(zip(slot, start)):
        runs.setdefault(int(s), []).append((int(t0), int(t0 + lengths[row]), row))
    return {s: sorted(r) for s, r in runs.items()}, int(sched.steps)


def test_a_slot_takes_the_next_row_as_soon_as_one_stops(ours_fp32, case):
    prompts, kw, ref, stops = case
    s = _sampler(ours_fp32.cfg, max_rows=3, stop_ids=stops)
    s.generate(ours_fp32, prompts, **kw)
    runs, steps = _slot_runs(s, ref["lengths"])
    assert set(runs) == {0, 1, 2}
    assert max(len(r) for r in runs.values()) >= 3  # 10 rows through 3 slots
    for r in runs.values():
        for (_, end, _), (start, _, _) in zip(r, r[1:]):
            assert start == end  # reused on the step after its row stopped: never idle while rows wait
    starts = sorted(t0 for r in runs.values() for t0, _, _ in r)
    assert starts[:3] == [0, 0, 0]
    assert steps == max(end for r in runs.values() for _, end, _ in r)
    # Rows take slots in row order.
    order = sorted((t0, row) for r in runs.values() for t0, _, row in r)
    assert [row for _, row in order] == sorted(row for _, row in order)

    chunked = _sampler(ours_fp32.cfg, max_rows=4, continuous=False, stop_ids=stops)
    chunked.generate(ours_fp32, prompts, **kw)
    chunk_runs, chunk_steps = _slot_runs(chunked, ref["lengths"])
    # Chunks of 4 rows, each until its longest row stops: more steps than 3 slots need.
    assert chunk_steps == sum(ref["lengths"][i : i + 4].max() for i in range(0, 10, 4))
    assert max(len(r) for r in chunk_runs.values()) == 3 and steps < chunk_steps


def test_sampled_rows_do_not_depend_on_the_slots(ours_fp32, case):
    """Each row draws with its own keys, so temperature sampling also gives the same rows."""
    prompts, kw, _, _ = case
    kw = dict(kw, params=SamplingParams(temperature=1.0))  # the samplers stop nowhere
    a = _host(_sampler(ours_fp32.cfg).generate(ours_fp32, prompts, **kw))
    b = _host(_sampler(ours_fp32.cfg, max_rows=3).generate(ours_fp32, prompts, **kw))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5)
    assert len({tuple(row) for row in a["tokens"][:2]}) == 2  # a prompt's two samples differ


def test_programs_do_not_depend_on_lengths(ours_fp32):
    s = _sampler(ours_fp32.cfg, max_rows=3)
    rng = np.random.default_rng(22)
    prompts = [_prompt(rng, [n]) for n in (5, 12, 30, 7)]
    for limits in ([8] * 8, [1, 8, 2, 7, 3, 6, 4, 5]):
        s.generate(ours_fp32, prompts, key=jax.random.key(0), max_new_tokens=NEW, n=N, row_max_new=limits)
    assert s.compiled_programs() == 2  # one prefill (groups of 1 prompt), one decode
    with pytest.raises(ValueError, match="row_max_new must hold 8 limits in 1..8"):
        s.generate(ours_fp32, prompts, key=jax.random.key(0), max_new_tokens=NEW, n=N, row_max_new=[9] * 8)


@pytest.mark.parametrize("impl", ["splash", "flash"])
def test_the_kernel_paths_give_the_same_greedy_rows(ours_fp32, case, impl):
    """Prefill through the fused kernel and every decode step through the live-span kernel (our
    TPU kernel for splash, jax's GPU one for flash; interpret mode on CPU), with 3 slots
    refilled as rows stop: the rows of the XLA path, token for token."""
    from flax import nnx

    prompts, kw, ref, stops = case
    cfg = ours_fp32.cfg.replace(attention_impl=impl)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(ours_fp32)(cfg, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, nnx.split(ours_fp32)[1])
    s = _sampler(cfg, 3, True, stops)
    out = _host(s.generate(model, prompts, **kw))
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    np.testing.assert_array_equal(out["lengths"], ref["lengths"])
    np.testing.assert_allclose(out["logprobs"], ref["logprobs"], atol=1e-5)
    assert s.last_cache == (3, 128 if impl == "splash" else 80)  # 64 + 8 entries, rounded up for the kernel
