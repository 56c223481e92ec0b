"""Vision inputs padded to `ModelConfig.vision_buckets`: the same logits and gradients as
transformers on the unpadded batch, and a number of compiled programs set by the buckets.

Buckets here are small (tiny random model, images of 2-20 patches a side) and chosen so
that every case really pads.
"""

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from qwen_fixtures import make_batch

from emor3_jax.core.batches import Prompt, prompt_images
from emor3_jax.models.qwen25_vl.model import prepare_inputs
from emor3_jax.models.qwen25_vl.vision import vision_layout

BUCKETS = (48, 80, 160, 192, 320)

# name -> (rows, pad side); ("image", h, w) in patches.
CASES = {
    "wide_1_to_11": ([[3, ("image", 2, 22), 4]], "left"),
    "tall_4_to_1": ([[5, ("image", 16, 4), 2]], "right"),
    "three_images_one_prompt": ([[2, ("image", 6, 10), 3, ("image", 12, 2), ("image", 4, 4), 1]], "left"),
    "text_rows_mixed_in": ([[7], [4, ("image", 10, 14), 3], [12], [1, ("image", 8, 6), 2]], "left"),
}


def _hf_logits(hf_model, batch):
    """transformers on the unpadded batch, M-RoPE positions from its own get_rope_index."""
    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"])
    tt = (ids == hf_model.config.image_token_id).long()
    grid = torch.tensor(batch["image_grid_thw"])
    pos, _ = hf_model.model.get_rope_index(ids, image_grid_thw=grid, mm_token_type_ids=tt, attention_mask=mask)
    with torch.no_grad():
        out = hf_model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            mm_token_type_ids=tt,
            pixel_values=torch.tensor(batch["pixel_values"]),
            image_grid_thw=grid,
        )
    return out.logits.numpy()


def _padded_inputs(cfg, batch, buckets=BUCKETS):
    inputs = prepare_inputs(cfg.replace(vision_buckets=buckets), **batch)
    inputs.pop("rope_deltas")
    return inputs


@nnx.jit
def _forward(model, inputs):
    return model(**inputs)


@pytest.mark.parametrize("name", list(CASES))
def test_padded_logits_match_transformers_unpadded(hf_tiny, ours_fp32, name):
    rows, side = CASES[name]
    batch = make_batch(rows, np.random.default_rng(1), side)
    inputs = _padded_inputs(ours_fp32.cfg, batch)
    n = batch["pixel_values"].shape[0]
    assert inputs["pixels"].shape[0] in BUCKETS and inputs["pixels"].shape[0] > n  # really padded
    ours = np.asarray(_forward(ours_fp32, inputs))
    ref = _hf_logits(hf_tiny, batch)
    real = batch["attention_mask"].astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-4


def test_an_image_shown_by_several_rows_is_encoded_once_with_the_same_logits(hf_tiny, ours_fp32):
    """Rows that show the same image (a prompt's samples, its reflections) pass it once, with
    image_index naming the image behind each one shown: transformers' logits on the batch that
    repeats the pixels, from a vision batch of the distinct images only."""
    a, b = ("image", 6, 10), ("image", 4, 4)
    batch = make_batch([[3, a, 2], [3, a, 4], [1, b, 2, a], [5]], np.random.default_rng(3), "left")
    pa, pb = batch["pixel_values"][:60], batch["pixel_values"][120:136]
    index = np.array([0, 0, 1, 0])
    batch["pixel_values"] = np.concatenate([pa, pa, pb, pa])  # what transformers is given
    distinct = dict(batch, pixel_values=np.concatenate([pa, pb]), image_grid_thw=np.array([[1, 6, 10], [1, 4, 4]]))
    inputs = prepare_inputs(ours_fp32.cfg.replace(vision_buckets=BUCKETS), **distinct, image_index=index)
    inputs.pop("rope_deltas")
    assert inputs["pixels"].shape[0] == 80  # 76 distinct patches; the repeated batch needs 320
    ours = np.asarray(_forward(ours_fp32, inputs))
    real = batch["attention_mask"].astype(bool)
    assert np.abs(ours - _hf_logits(hf_tiny, batch))[real].max() <= 1e-4


def test_prompt_images_passes_each_array_once():
    img = lambda n: (np.full((n, 4), float(n), np.float32), np.array([[1, 2, n // 2]]))
    (pa, ga), (pb, gb) = img(4), img(8)
    two = (np.concatenate([pa, pb]), np.concatenate([ga, gb]))
    prompts = [
        Prompt(np.arange(3), pa, ga),
        Prompt(np.arange(2)),
        Prompt(np.arange(5), *two),
        Prompt(np.arange(3), pa, ga),
    ]
    pixels, grids, index = prompt_images(prompts)
    np.testing.assert_array_equal(pixels, np.concatenate([pa, pa, pb]))  # `two` is another array: kept
    np.testing.assert_array_equal(grids, [[1, 2, 2], [1, 2, 2], [1, 2, 4]])
    np.testing.assert_array_equal(index, [0, 1, 2, 0])
    assert prompt_images([Prompt(np.arange(3))]) == (None, None, None)


def test_rows_past_the_minimum_take_the_packing_bound(hf_tiny, ours_fp32):
    """Five 6x6-patch images (36 patches, one window each) padded to 192: neither 36-patch
    window fits twice in a 64-slot row, nor frame in a 48-slot row, so the rows are the
    bound ceil(2L / S), not ceil(L / S); the logits still match."""
    rows = [[1, ("image", 6, 6), ("image", 6, 6), 2], [("image", 6, 6), 3, ("image", 6, 6), ("image", 6, 6)]]
    batch = make_batch(rows, np.random.default_rng(7), "right")
    inputs = _padded_inputs(ours_fp32.cfg, batch)
    layout = inputs["layout"]
    assert layout.windows.index.shape == (6, 64) and layout.frames.index.shape == (8, 48)
    ours = np.asarray(_forward(ours_fp32, inputs))
    ref = _hf_logits(hf_tiny, batch)
    assert np.abs(ours - ref)[batch["attention_mask"].astype(bool)].max() <= 1e-4


def test_padding_patches_never_reach_real_outputs(ours_fp32):
    """Noise instead of zeros in the padding patches changes no real logit: they attend only
    among themselves and their merged tokens are never written into the embeddings."""
    rows, side = CASES["text_rows_mixed_in"]
    batch = make_batch(rows, np.random.default_rng(2), side)
    inputs = _padded_inputs(ours_fp32.cfg, batch)
    pad = np.asarray(inputs["layout"].patch_order) < 0
    assert pad.sum() == inputs["pixels"].shape[0] - batch["pixel_values"].shape[0] > 0
    noise = 100 * np.random.default_rng(3).standard_normal(inputs["pixels"].shape).astype(np.float32)
    noisy = dict(inputs, pixels=np.where(pad[:, None], noise, inputs["pixels"]))
    a, b = np.asarray(_forward(ours_fp32, inputs)), np.asarray(_forward(ours_fp32, noisy))
    real = batch["attention_mask"].astype(bool)
    assert np.abs(a - b)[real].max() <= 1e-5


def test_padding_patches_have_blocks_of_their_own(ours_fp32):
    batch = make_batch(CASES["three_images_one_prompt"][0], np.random.default_rng(4))
    layout = vision_layout(batch["image_grid_thw"], None, ours_fp32.cfg.vision, BUCKETS)
    n, total = batch["pixel_values"].shape[0], layout.patch_order.size  # real, padded (slot index total: empty)
    for blocks in (layout.windows, layout.frames):
        index, segment = blocks.index, blocks.segment
        real, padding = segment[index < n], segment[(index >= n) & (index < total)]
        assert padding.size and not np.isin(padding, real).any()
        # Every patch sits in exactly one slot, and unblock finds it there.
        np.testing.assert_array_equal(index.reshape(-1)[blocks.unblock], np.arange(total))


# Five images (60, 24, 16, 48, 36 patches; 184) past the largest bucket 80: three chunks
# of at most 80 patches, first fit from the largest (60+16, 48+24, 36), and a fourth of
# padding (a power-of-two count).
PAST_LARGEST = [
    [2, ("image", 6, 10), 3, ("image", 12, 2), ("image", 4, 4), 1],
    [4, ("image", 8, 6), 3],
    [("image", 6, 6), 2],
]


def test_a_batch_past_the_largest_bucket_is_encoded_in_chunks_with_the_same_logits(hf_tiny, ours_fp32):
    batch = make_batch(PAST_LARGEST, np.random.default_rng(5), "left")
    inputs = _padded_inputs(ours_fp32.cfg, batch, (48, 80))
    layout = inputs["layout"]
    assert inputs["pixels"].shape[0] == 4 * 80 and layout.windows.index.shape[0] == layout.frames.index.shape[0] == 4
    chunk_of = np.asarray(layout.patch_order).reshape(4, 80)
    assert [int((c >= 0).sum()) for c in chunk_of] == [76, 72, 36, 0]  # no image split, none dropped
    ours = np.asarray(_forward(ours_fp32, inputs))
    real = batch["attention_mask"].astype(bool)
    assert np.abs(ours - _hf_logits(hf_tiny, batch))[real].max() <= 1e-4


def test_chunked_gradients_equal_the_unpadded_ones(ours_fp32):
    """The loop over chunks passes gradients to the tower's parameters as one batch does, with
    the blocks rematerialised or not."""
    batch = make_batch(PAST_LARGEST, np.random.default_rng(6), "left")
    real = batch["attention_mask"].astype(bool)
    loss = lambda model, inputs: (model(**inputs)[real] ** 2).mean()
    grad = nnx.jit(nnx.grad(loss))
    unpadded, chunked = _padded_inputs(ours_fp32.cfg, batch, ()), _padded_inputs(ours_fp32.cfg, batch, (48, 80))
    model = nnx.clone(ours_fp32)
    want = nnx.state(grad(model, unpadded), nnx.Param)  # remat changes no gradient (test_remat_...)
    assert all(float(np.abs(w).max()) > 0 for w in jax.tree.leaves(want["visual"]))
    for remat in (None, "nothing"):
        model.visual.remat = remat
        got = nnx.state(grad(model, chunked), nnx.Param)
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(np.abs(w).max()))


def test_images_shown_past_the_largest_bucket_take_a_chunk_count_of_features(ours_fp32):
    """One 6x10 image shown by eight rows (a rollout group): 60 distinct patches fit the bucket
    80, the 480 shown features are padded to 8 x 80 patches' worth, not refused."""
    layout = vision_layout(np.array([[1, 6, 10]]), None, ours_fp32.cfg.vision, (48, 80), np.zeros(8, int))
    assert layout.patch_order.shape == (80,) and layout.merged_image.shape == (8 * 80 // 4,)
    np.testing.assert_array_equal(layout.merged_image[:120], np.tile(layout.merged_image[:15], 8))


def test_an_image_over_the_largest_bucket_names_the_flag(ours_fp32):
    batch = make_batch([[2, ("image", 16, 16), ("image", 10, 8), 1]], np.random.default_rng(5))  # 256 + 80 patches
    with pytest.raises(
        ValueError,
        match=r"an image \(or video\) of 256 patches exceeds the largest vision bucket 160: .*"
        r"--config.model.vision_buckets",
    ):
        _padded_inputs(ours_fp32.cfg, batch, (48, 80, 160))


def _signature(inputs) -> tuple:
    """The input shapes a jitted program is specialised on."""
    return tuple(np.shape(x) for x in jax.tree.leaves(inputs))


def test_forty_image_sizes_compile_a_bounded_number_of_programs(hf_tiny, ours_fp32):
    """40 batches, each with an image size of its own (sides 2-20 patches, aspect ratios up
    to 1:10), odd batches with a second image and a text-only row. The forward compiles at
    most one program per (batch bucket, frame bucket <= it, window rows in 2 choices, frame
    rows in 2 choices), under 40; each program matches transformers on its first batch."""
    buckets = (128, 320, 800)
    bound = 4 * len(buckets) * (len(buckets) + 1) // 2
    assert bound < 40
    traces = []

    @jax.jit
    def forward(state, inputs):
        traces.append(1)  # runs once per trace, i.e. per compiled program
        return nnx.merge(graphdef, state)(**inputs)

    graphdef, state = nnx.split(ours_fp32)
    rng = np.random.default_rng(6)
    sides = [(h, w) for h in range(2, 21, 2) for w in range(2, 21, 2)]
    sizes = [sides[i] for i in rng.choice(len(sides), 40, replace=False)]
    unpadded_shapes = set()
    for i, (h, w) in enumerate(sizes):
        rows = [[3, ("image", h, w), 2]]
        if i % 2:
            h2, w2 = sizes[-1 - i]
            rows += [[6], [1, ("image", h2, w2), 4]]
        batch = make_batch(rows, rng, "left", length=112)
        unpadded_shapes.add(_signature(prepare_inputs(ours_fp32.cfg, **batch)))
        inputs = _padded_inputs(ours_fp32.cfg, batch, buckets)
        total = inputs["pixels"].shape[0]
        for blocks in (inputs["layout"].windows, inputs["layout"].frames):
            rows, width = blocks.index.shape  # the fewest rows that hold L patches, or the packing bound
            assert rows in (-(-total // width), -(-2 * total // width))
        programs = len(traces)
        ours = np.asarray(forward(state, inputs))
        if len(traces) > programs:  # each program's first batch against transformers (~1 s each)
            ref = _hf_logits(hf_tiny, batch)
            real = batch["attention_mask"].astype(bool)
            assert np.abs(ours - ref)[real].max() <= 1e-4, f"batch {i}: image sizes {rows}"
    assert len(traces) <= bound, f"{len(traces)} programs for {len(buckets)} buckets"
    assert len(unpadded_shapes) > bound  # unpadded, nearly every batch is a new program
    print(f"{len(traces)} programs for 40 image sizes (bound {bound}; unpadded {len(unpadded_shapes)})")


def test_the_sampler_pads_through_prepare_inputs_unchanged(ours_fp32):
    """The sampler (a caller of prepare_inputs) with a bucketed config: 12 image sizes, two
    prompts per call, compile at most the buckets' prefill programs plus one decode, and
    give the greedy tokens of an unbucketed sampler."""
    from emor3_jax.core.batches import Prompt
    from emor3_jax.sampling.methods import GREEDY
    from emor3_jax.sampling.sampler import Sampler

    buckets = (64, 256)
    rng = np.random.default_rng(8)

    def prompt(h, w):
        batch = make_batch([[3, ("image", h, w), 2]], rng)
        return Prompt(batch["input_ids"][0], batch["pixel_values"], batch["image_grid_thw"])

    sizes = [(2, 4), (4, 14), (6, 6), (2, 20), (8, 8), (10, 4), (12, 6), (4, 16), (14, 8), (6, 18), (16, 10), (12, 12)]
    calls = [[prompt(*sizes[i]), prompt(*sizes[-1 - i])] for i in range(len(sizes))]
    kw = dict(prompt_buckets=(96,), gen_buckets=(4,), pad_id=0)
    padded = Sampler(ours_fp32.cfg.replace(vision_buckets=buckets), **kw)
    unpadded = Sampler(ours_fp32.cfg, **kw)
    gen = dict(key=jax.random.key(0), max_new_tokens=4, n=1, params=GREEDY)
    for i, prompts in enumerate(calls):
        out = padded.generate(ours_fp32, prompts, **gen)
        if i in (0, len(calls) - 1):
            ref = unpadded.generate(ours_fp32, prompts, **gen)
            np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    bound = 4 * len(buckets) * (len(buckets) + 1) // 2 + 1
    assert padded.compiled_programs() <= bound and padded.compiled_programs() < len(calls)  # 3 when written
