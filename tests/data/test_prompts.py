"""Tests for emor3_jax.data.prompts: question and SET text, chat rendering, SFT masks,
image token expansion."""

import numpy as np
import pytest

from emor3_jax.data import prompts
from emor3_jax.data.tokenizers import build_test_tokenizer, special_token_ids

EMOSET_QUESTION = (
    "<image>Which emotion best describes the image?\n"
    "Answer the question using one emotional category: "
    "amusement, anger, awe, contentment, disgust, excitement, fear, sadness."
)
SET_PROMPT = """<image>Which emotion best describes the image?
Answer the question using one emotional category: amusement, anger, awe, contentment, disgust, excitement, fear, sadness.

You First think the emotional meaning step by step, and then provide the final answer.

The reasoning process MUST follow the structure below:
<step1>Identify what in the scene could trigger emotion (action, face, environment).</step1>
<step2>Describe how a human would feel about it.</step2>
<step3>Conclude if the emotion is positive or negative, and if it's high or low arousal.</step3>

The final answer MUST BE put in \\boxed{}."""
ANSWER = "<step1> a dark X </step1><step2> anger </step2><step3> negative, high </step3> \\boxed{anger}"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return build_test_tokenizer(str(tmp_path_factory.mktemp("small")))


def test_label_sets():
    assert prompts.EMOSET_LABELS == (
        "amusement",
        "anger",
        "awe",
        "contentment",
        "disgust",
        "excitement",
        "fear",
        "sadness",
    )
    assert prompts.EMOTION6_LABELS == ("anger", "disgust", "fear", "joy", "sadness", "surprise")
    assert set(prompts.VALENCE_AROUSAL) == set(prompts.EMOSET_LABELS)
    positive = {k for k, (v, _) in prompts.VALENCE_AROUSAL.items() if v == "positive"}
    assert positive == {"amusement", "awe", "contentment", "excitement"}
    low = {k for k, (_, a) in prompts.VALENCE_AROUSAL.items() if a == "low"}
    assert low == {"awe", "contentment", "sadness"}


def test_question_text():
    assert prompts.question(prompts.EMOSET_LABELS) == EMOSET_QUESTION
    assert prompts.question(prompts.EMOTION6_LABELS).endswith("category: anger, disgust, fear, joy, sadness, surprise.")


@pytest.mark.parametrize("labels", [[], ["Awe"], ["awe, joy"]])
def test_question_rejects_bad_labels(labels):
    with pytest.raises(ValueError):
        prompts.question(labels)


def test_set_prompt_exact():
    assert prompts.set_prompt(EMOSET_QUESTION) == SET_PROMPT
    # The question is trimmed first.
    assert prompts.set_prompt("  \n" + EMOSET_QUESTION + "\n\n ") == SET_PROMPT


def test_chat_messages():
    assert prompts.chat_messages("<image>Hi?") == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}
    ]
    assert prompts.chat_messages("Just text") == [{"role": "user", "content": [{"type": "text", "text": "Just text"}]}]
    assert prompts.chat_messages("A<image>B<image>")[0]["content"] == [
        {"type": "text", "text": "A"},
        {"type": "image"},
        {"type": "text", "text": "B"},
        {"type": "image"},
    ]


def test_render_one_image(small):
    text = prompts.set_prompt(EMOSET_QUESTION)
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        + SET_PROMPT[len("<image>") :]
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompts.render(small, text) == expected
    assert prompts.render(small, text, ANSWER) == expected + ANSWER + "<|im_end|>"
    ids = prompts.encode_prompt(small, text)
    assert ids.dtype == np.int32
    assert small.decode(ids.tolist()) == expected
    assert int((ids == small.convert_tokens_to_ids("<|image_pad|>")).sum()) == 1


def test_render_text_only(small):
    assert prompts.render(small, "Hello") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_sft_mask_covers_answer_and_im_end(small):
    text = prompts.set_prompt(EMOSET_QUESTION)
    ids, mask = prompts.encode_for_sft(small, text, ANSWER)
    prompt = prompts.encode_prompt(small, text)
    assert ids.shape == mask.shape and mask.dtype == bool
    np.testing.assert_array_equal(ids[: len(prompt)], prompt)
    assert not mask[: len(prompt)].any() and mask[len(prompt) :].all()
    assert small.decode(ids[mask].tolist()) == ANSWER + "<|im_end|>"
    assert ids[-1] == small.convert_tokens_to_ids("<|im_end|>")
    # The whole sequence decodes to the rendered supervised example.
    assert small.decode(ids.tolist()) == prompts.render(small, text, ANSWER)


def test_expand_image_tokens(small):
    pad = special_token_ids(small)["<|image_pad|>"]
    ids = np.array([5, pad, 6, 7, pad, 8], np.int32)
    out = prompts.expand_image_tokens(ids, [[1, 4, 6], [1, 2, 2]], pad)
    expected = [5] + [pad] * 6 + [6, 7] + [pad] + [8]
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.int32
    # merge_size 1 keeps every patch; no images leaves ids as they are.
    assert len(prompts.expand_image_tokens(ids, np.array([[1, 4, 6], [2, 2, 2]]), pad, merge_size=1)) == 4 + 24 + 8
    np.testing.assert_array_equal(prompts.expand_image_tokens([1, 2, 3], [], pad), [1, 2, 3])


def test_expand_image_tokens_on_rendered_prompt(small):
    pad = small.convert_tokens_to_ids("<|image_pad|>")
    ids = prompts.encode_prompt(small, "<image>What is it?<image>")
    out = prompts.expand_image_tokens(ids, [[1, 2, 2], [1, 4, 8]], pad)
    assert int((out == pad).sum()) == 1 + 8
    assert len(out) == len(ids) + 7


@pytest.mark.parametrize("grids", [[[1, 2, 2]], [[1, 2, 2]] * 3, [[1, 3, 2], [1, 2, 2]]])
def test_expand_image_tokens_errors(grids):
    with pytest.raises(ValueError):
        prompts.expand_image_tokens(np.array([0, 9, 1, 9]), grids, image_pad_id=9)
