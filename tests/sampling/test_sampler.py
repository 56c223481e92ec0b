"""The on-device sampler against transformers' generate and against the softmax it samples.

Greedy tokens equal `generate(do_sample=False)` token for token; returned log-probs equal
log-softmax of transformers' logits; sampled first tokens follow softmax(logits / T)
(chi-square, with a check that a wrong temperature or a wrong nucleus fails); filters,
logit bias, keys, prefill-once-and-fork and 8-device sharding.
"""

import jax
import numpy as np
import pytest
import torch
from qwen_fixtures import IMAGE, PATCH_DIM, VEND, VSTART, hf_model
from scipy import stats

from emor3_jax.core import sharding
from emor3_jax.core.batches import Prompt
from emor3_jax.models.qwen25_vl.convert import load_hf
from emor3_jax.sampling.methods import GREEDY, SamplingParams
from emor3_jax.sampling.sampler import Sampler

RULES = sharding.DEFAULT_RULES
FP32 = dict(param_dtype="float32", compute_dtype="float32")
PAD = 0


def _prompt(rng, segments):
    """segments: ints (text tokens) or (h, w) image grids in patches."""
    ids, pixels, grids = [], [], []
    for s in segments:
        if isinstance(s, int):
            ids += rng.integers(1, IMAGE - 10, size=s).tolist()
        else:
            h, w = s
            grids.append([1, h, w])
            pixels.append(rng.standard_normal((h * w, PATCH_DIM)).astype(np.float32))
            ids += [VSTART] + [IMAGE] * (h * w // 4) + [VEND]
    if not grids:
        return Prompt(np.array(ids))
    return Prompt(np.array(ids), np.concatenate(pixels), np.array(grids))


def _hf_generate(model, prompts, max_new, stop_ids):
    """transformers' greedy generate on the left-padded batch; also its per-step logits."""
    t = max(len(p.ids) for p in prompts)
    ids = torch.zeros((len(prompts), t), dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p.ids) :] = torch.tensor(p.ids)
        mask[i, t - len(p.ids) :] = 1
    kw = {}
    with_img = [p for p in prompts if p.image_grid_thw is not None]
    if with_img:
        kw = dict(
            pixel_values=torch.tensor(np.concatenate([p.pixel_values for p in with_img])),
            image_grid_thw=torch.tensor(np.concatenate([p.image_grid_thw for p in with_img])),
        )
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        mm_token_type_ids=(ids == IMAGE).long(),
        do_sample=False,
        max_new_tokens=max_new,
        pad_token_id=PAD,
        eos_token_id=list(stop_ids) or None,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )
    tokens = out.sequences[:, t:].numpy()
    logp = torch.stack(out.logits, 1).log_softmax(-1).numpy()
    return tokens, logp


@pytest.fixture(scope="module")
def sampler(ours_fp32):
    return Sampler(ours_fp32.cfg, prompt_buckets=(32, 64, 128), gen_buckets=(8, 16), pad_id=PAD)


CASES = {
    "text_only": [[11]],
    "one_image": [[4, (8, 12), 5]],
    "two_images_sizes": [[3, (12, 20), 2, (8, 8), 4]],
    "mixed_lengths_batch": [[4, (8, 12), 5], [9], [2, (4, 4), 7], [30]],
}


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_equals_transformers_generate(hf_tiny, ours_fp32, sampler, name):
    rng = np.random.default_rng(5)
    prompts = [_prompt(rng, segs) for segs in CASES[name]]
    max_new = 10
    ref, _ = _hf_generate(hf_tiny, prompts, max_new, ())
    stop_ids = ()
    if len(prompts) > 1:
        # A stop token that ends one row early and never appears in another: both sides must stop there.
        for tok in ref[0][1:4]:
            if not all(tok in row for row in ref):
                stop_ids = (int(tok),)
                break
        assert stop_ids, "no usable stop token in the reference output"
        ref, _ = _hf_generate(hf_tiny, prompts, max_new, stop_ids)
    out = sampler.with_stops(stop_ids).generate(
        ours_fp32, prompts, key=jax.random.key(0), max_new_tokens=max_new, params=GREEDY
    )
    tokens = np.asarray(out.tokens)[:, :max_new]
    np.testing.assert_array_equal(tokens, ref)
    lengths = np.asarray(out.lengths)
    for row, length, done in zip(ref, lengths, np.asarray(out.done)):
        stops = [i for i, t in enumerate(row) if t in stop_ids]
        assert length == (stops[0] + 1 if stops else max_new)
        assert done == bool(stops)
    if stop_ids:
        assert lengths.min() < max_new < lengths.max() + 1  # a row really stopped early


def test_logprobs_equal_transformers_log_softmax(hf_tiny, ours_fp32, sampler):
    rng = np.random.default_rng(6)
    prompts = [_prompt(rng, segs) for segs in CASES["mixed_lengths_batch"]]
    ref_tokens, ref_logp = _hf_generate(hf_tiny, prompts, 8, ())
    out = sampler.generate(ours_fp32, prompts, key=jax.random.key(0), max_new_tokens=8, params=GREEDY)
    picked = np.take_along_axis(ref_logp, ref_tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs)[:, :8], picked, atol=1e-4)


def test_sampled_logprobs_are_the_unmodified_policy(hf_tiny, ours_fp32, sampler):
    """With temperature, top-p and a bias, log-probs still score the raw model (teacher forcing)."""
    rng = np.random.default_rng(7)
    prompt = _prompt(rng, [5, (8, 8), 4])
    params = SamplingParams(temperature=0.6, top_p=0.95)
    out = sampler.with_stops(logit_bias={7: 2.0}).generate(
        ours_fp32, [prompt], key=jax.random.key(3), max_new_tokens=6, params=params
    )
    gen = np.asarray(out.tokens)[0, :6]
    ids = torch.tensor(np.concatenate([prompt.ids, gen]))[None]
    tt = (ids == IMAGE).long()
    grid = torch.tensor(prompt.image_grid_thw)
    pos, _ = hf_tiny.model.get_rope_index(ids, image_grid_thw=grid, mm_token_type_ids=tt)
    with torch.no_grad():
        logits = hf_tiny(
            input_ids=ids,
            position_ids=pos,
            mm_token_type_ids=tt,
            image_grid_thw=grid,
            pixel_values=torch.tensor(prompt.pixel_values),
        ).logits
    n = len(prompt.ids)
    ref = logits[0, n - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(gen)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(out.logprobs)[0, :6], ref, atol=1e-4)


@pytest.fixture(scope="module")
def peaky(tmp_path_factory, mesh1):
    """A model with a sharp next-token distribution (lm_head scaled), so temperature matters."""
    hf = hf_model(seed=11)
    with torch.no_grad():
        hf.lm_head.weight.mul_(12.0)
    path = str(tmp_path_factory.mktemp("peaky"))
    hf.save_pretrained(path)
    prompt = _prompt(np.random.default_rng(8), [6, (4, 4), 3])
    ids = torch.tensor(prompt.ids)[None]
    tt = (ids == IMAGE).long()
    grid = torch.tensor(prompt.image_grid_thw)
    pos, _ = hf.model.get_rope_index(ids, image_grid_thw=grid, mm_token_type_ids=tt)
    with torch.no_grad():
        logits = (
            hf(
                input_ids=ids,
                position_ids=pos,
                mm_token_type_ids=tt,
                image_grid_thw=grid,
                pixel_values=torch.tensor(prompt.pixel_values),
            )
            .logits[0, -1]
            .double()
            .numpy()
        )
    model = load_hf(path, mesh1, RULES, **FP32)
    return model, prompt, logits


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _chi2_pvalue(counts, probs):
    """Chi-square goodness of fit; bins with expected < 5 are pooled into one."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:  # pooled bin too small: fold it into the smallest kept bin
        obs, exp = obs[:-1].copy(), exp[:-1].copy()
        i = np.argmin(exp)
        obs[i] += counts[~big].sum()
        exp[i] += expected[~big].sum()
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def _first_tokens(model, prompt, params, draws=3000, seed=0, bias=None):
    s = Sampler(model.cfg, prompt_buckets=(32,), gen_buckets=(8,), pad_id=PAD, logit_bias=bias)
    out = s.generate(model, [prompt], key=jax.random.key(seed), max_new_tokens=1, n=draws, params=params)
    tokens = np.asarray(out.tokens)[:, 0]
    return np.bincount(tokens, minlength=model.cfg.text.vocab_size)


def test_sampling_follows_softmax_at_temperature(peaky):
    model, prompt, logits = peaky
    t = 0.7
    probs = _softmax(logits / t)
    assert probs.max() < 0.9 and (probs > 0.01).sum() >= 4, "distribution too flat or too sharp to test"
    counts = _first_tokens(model, prompt, SamplingParams(temperature=t))
    assert _chi2_pvalue(counts, probs) > 1e-3
    # The same counts reject a 25% wrong temperature: the test can tell.
    assert _chi2_pvalue(counts, _softmax(logits / (t * 1.25))) < 1e-6


def test_top_p_samples_exactly_the_nucleus(peaky):
    model, prompt, logits = peaky
    probs = _softmax(logits)
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    top_p = float(np.cumsum(probs[order])[2] - 0.01)  # crossing token = 3rd most likely
    nucleus = order[mass_before < top_p]
    assert len(nucleus) == 3
    counts = _first_tokens(model, prompt, SamplingParams(top_p=top_p))
    outside = np.setdiff1d(np.nonzero(counts)[0], nucleus)
    assert outside.size == 0, f"tokens outside the nucleus: {outside}"
    renorm = np.zeros_like(probs)
    renorm[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert counts[order[2]] > 0  # the token that crosses top_p is kept (no off-by-one)
    assert _chi2_pvalue(counts, renorm) > 1e-3


def test_top_k_and_min_p_never_leave_their_sets(peaky):
    model, prompt, logits = peaky
    probs = _softmax(logits)
    counts = _first_tokens(model, prompt, SamplingParams(top_k=2), draws=1000)
    assert set(np.nonzero(counts)[0]) == set(np.argsort(-probs)[:2])
    min_p = 0.2
    allowed = set(np.nonzero(probs >= min_p * probs.max())[0])
    counts = _first_tokens(model, prompt, SamplingParams(min_p=min_p), draws=1000)
    assert set(np.nonzero(counts)[0]) <= allowed and len(allowed) < (probs > 1e-4).sum()


def test_logit_bias_is_obeyed(peaky):
    model, prompt, logits = peaky
    top = int(np.argmax(logits))
    counts = _first_tokens(model, prompt, SamplingParams(), draws=1000, bias={top: -np.inf})
    assert counts[top] == 0
    forced = 123
    counts = _first_tokens(model, prompt, GREEDY, draws=4, bias={forced: 1e4})
    assert counts[forced] == 4


def test_keys_reproduce_and_vary(ours_fp32, sampler):
    prompt = _prompt(np.random.default_rng(9), [5, (8, 8), 3])
    gen = lambda k: np.asarray(
        sampler.generate(ours_fp32, [prompt], key=jax.random.key(k), max_new_tokens=8, n=4).tokens
    )
    a, b, c = gen(1), gen(1), gen(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(row) for row in a}) == 4  # the group's rows differ from each other


def test_fork_equals_prefilling_each_copy(ours_fp32, sampler):
    rng = np.random.default_rng(10)
    prompts = [_prompt(rng, [4, (8, 12), 2]), _prompt(rng, [13])]
    n = 3
    copies = [p for p in prompts for _ in range(n)]
    for params in (GREEDY, SamplingParams(temperature=1.0)):
        forked = sampler.generate(ours_fp32, prompts, key=jax.random.key(4), max_new_tokens=8, n=n, params=params)
        each = sampler.generate(ours_fp32, copies, key=jax.random.key(4), max_new_tokens=8, n=1, params=params)
        np.testing.assert_array_equal(np.asarray(forked.tokens), np.asarray(each.tokens))
        np.testing.assert_allclose(np.asarray(forked.logprobs), np.asarray(each.logprobs), atol=1e-5)


def test_sharded_sampler_gives_the_same_greedy_tokens(hf_tiny_dir, ours_fp32, sampler):
    rng = np.random.default_rng(12)
    prompts = [_prompt(rng, segs) for segs in CASES["mixed_lengths_batch"]]
    ref = sampler.generate(ours_fp32, prompts, key=jax.random.key(0), max_new_tokens=8, n=2, params=GREEDY)
    mesh = sharding.make_mesh([("data", 1), ("fsdp", 4), ("tensor", 2)])
    model = load_hf(hf_tiny_dir, mesh, RULES, **FP32)
    sharded = Sampler(model.cfg, prompt_buckets=(64,), gen_buckets=(8,), pad_id=PAD)
    out = sharded.generate(model, prompts, key=jax.random.key(0), max_new_tokens=8, n=2, params=GREEDY)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    assert len(out.tokens.sharding.device_set) == 8


def test_buckets_bound_the_compiled_programs(ours_fp32):
    s = Sampler(ours_fp32.cfg, prompt_buckets=(16, 32), gen_buckets=(8,), pad_id=PAD)
    rng = np.random.default_rng(13)
    for length, new in ((5, 3), (9, 8), (14, 5)):  # all in bucket (16, 8)
        s.generate(ours_fp32, [_prompt(rng, [length])], key=jax.random.key(0), max_new_tokens=new)
    assert s.compiled_programs() == 2  # one prefill, one decode
    with pytest.raises(ValueError, match="prompt length of 40 exceeds the largest bucket 32"):
        s.generate(ours_fp32, [_prompt(rng, [40])], key=jax.random.key(0), max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens of 9 exceeds the largest bucket 8"):
        s.generate(ours_fp32, [_prompt(rng, [4])], key=jax.random.key(0), max_new_tokens=9)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(min_p=1.0), "min_p must be in"),
    ],
)
def test_bad_sampling_params_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


def test_max_rows_samples_in_chunks(ours_fp32):
    """3 prompts x n=2 with at most 4 rows at once: chunks of 2 prompts (the last padded), the
    cache never holds more than 4 rows, and greedy rows equal one unchunked call's."""
    rng = np.random.default_rng(11)
    prompts = [_prompt(rng, segs) for segs in ([4, (8, 12), 5], [9], [2, (4, 4), 7])]
    kw = dict(key=jax.random.key(0), max_new_tokens=6, n=2, params=GREEDY)
    whole = Sampler(ours_fp32.cfg, prompt_buckets=(32, 64), gen_buckets=(8,), pad_id=PAD)
    chunked = Sampler(ours_fp32.cfg, prompt_buckets=(32, 64), gen_buckets=(8,), pad_id=PAD, max_rows=4)
    a, b = whole.generate(ours_fp32, prompts, **kw), chunked.generate(ours_fp32, prompts, **kw)
    assert np.asarray(b.tokens).shape == (6, 8)
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
    np.testing.assert_array_equal(np.asarray(b.lengths), np.asarray(a.lengths))
    np.testing.assert_allclose(np.asarray(b.logprobs), np.asarray(a.logprobs), atol=1e-4)
    assert chunked.last_cache[0] == 4
    with pytest.raises(ValueError, match="max_rows must be >= 0"):
        Sampler(ours_fp32.cfg, prompt_buckets=(32,), gen_buckets=(8,), pad_id=PAD, max_rows=-1)


def test_with_stops_shares_the_programs_and_changes_only_the_stops(ours_fp32):
    s = Sampler(ours_fp32.cfg, prompt_buckets=(32,), gen_buckets=(8,), pad_id=PAD, stop_ids=(-5,))
    prompt = _prompt(np.random.default_rng(14), [7])
    kw = dict(key=jax.random.key(0), max_new_tokens=8, params=GREEDY)
    free = np.asarray(s.generate(ours_fp32, [prompt], **kw).tokens)[0]
    stopped = s.with_stops((int(free[2]),))
    out = stopped.generate(ours_fp32, [prompt], **kw)
    first = list(free).index(free[2])  # the first time that token comes
    assert int(out.lengths[0]) == first + 1 and bool(out.done[0])
    np.testing.assert_array_equal(np.asarray(out.tokens)[0, : first + 1], free[: first + 1])
    # One stop id either way: the same programs, counted once for both samplers.
    assert s.compiled_programs() == stopped.compiled_programs() == 2
    assert s.stop_ids == (-5,) and stopped.stop_ids == (int(free[2]),)
    assert stopped.with_stops(logit_bias={3: 1.0}).stop_ids == stopped.stop_ids  # None keeps the stops
