"""Label sets, the EMO-R3 question and SET prompt, and chat-template encoding.

A prompt text marks each image with `<image>` (as the data sets' `problem` field does).
`chat_messages` turns it into one user turn `[image, text, ...]`; `render` applies the
tokenizer's Qwen2.5-VL chat template (default system prompt, generation prompt added).
The template emits ONE `<|image_pad|>` per image; `expand_image_tokens` repeats the k-th
one `t * h * w / merge**2` times, as Qwen's processor does, once the image grids are known.

Letters: T tokens, I images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IMAGE_MARKER = "<image>"
IM_END = "<|im_end|>"

# Mikels' 8 classes in EmoSet's order (spec section 1).
EMOSET_LABELS = ("amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness")
# Ekman's 6 classes as Emotion6 lists them.
EMOTION6_LABELS = ("anger", "disgust", "fear", "joy", "sadness", "surprise")
# label -> (valence, arousal) of the Mikels classes (spec section 6), the content of step 3.
VALENCE_AROUSAL = {
    "amusement": ("positive", "high"),
    "anger": ("negative", "high"),
    "awe": ("positive", "low"),
    "contentment": ("positive", "low"),
    "disgust": ("negative", "high"),
    "excitement": ("positive", "high"),
    "fear": ("negative", "high"),
    "sadness": ("negative", "low"),
}

# Structured Emotional Thinking suffix (spec section 2), verbatim, "You First" included.
SET_SUFFIX = (
    "\n\nYou First think the emotional meaning step by step, and then provide the final answer.\n\n"
    "The reasoning process MUST follow the structure below:\n"
    "<step1>Identify what in the scene could trigger emotion (action, face, environment).</step1>\n"
    "<step2>Describe how a human would feel about it.</step2>\n"
    "<step3>Conclude if the emotion is positive or negative, and if it's high or low arousal.</step3>\n\n"
    "The final answer MUST BE put in \\boxed{}."
)


def question(labels: Sequence[str]) -> str:
    """The data set's `problem` text for `labels`: `<image>` first, then the question and
    the comma-separated category list (spec section 1)."""
    labels = list(labels)
    if not labels:
        raise ValueError("question: empty label list")
    for label in labels:
        if not label or label != label.strip().lower() or "," in label:
            raise ValueError(f"question: label {label!r} must be a non-empty lower-case word without commas")
    return (
        f"{IMAGE_MARKER}Which emotion best describes the image?\n"
        f"Answer the question using one emotional category: {', '.join(labels)}."
    )


def set_prompt(question: str) -> str:
    """`question` trimmed, followed by the SET instructions (spec section 2)."""
    return question.strip() + SET_SUFFIX


def chat_messages(text: str) -> list[dict]:
    """One user turn for the chat template: `{"type": "image"}` where each `<image>` was,
    `{"type": "text", "text": ...}` for the (non-empty) text between markers."""
    content = []
    for k, piece in enumerate(text.split(IMAGE_MARKER)):
        if k > 0:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return [{"role": "user", "content": content}]


def render(tokenizer, text: str, answer: str | None = None) -> str:
    """The chat-template string of `text` as one user turn, generation prompt added; with
    `answer`, followed by `answer` and `<|im_end|>` (a supervised example)."""
    prompt = tokenizer.apply_chat_template(chat_messages(text), tokenize=False, add_generation_prompt=True)
    return prompt if answer is None else prompt + answer + IM_END


def encode_prompt(tokenizer, text: str) -> np.ndarray:
    """Token ids [T] (int32) of `render(tokenizer, text)`, one `<|image_pad|>` per image."""
    return np.asarray(tokenizer.encode(render(tokenizer, text), add_special_tokens=False), np.int32)


def encode_for_sft(tokenizer, text: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T] int32, answer_mask [T] bool) of prompt + `answer` + `<|im_end|>`.

    The prompt and the answer are tokenized separately and concatenated, so the prompt ids
    equal `encode_prompt` and the answer ids are what the policy would sample after them.
    `answer_mask` is True on the answer tokens and the closing `<|im_end|>`: the tokens the
    SFT loss is taken on.
    """
    prompt = encode_prompt(tokenizer, text)
    reply = np.asarray(tokenizer.encode(answer + IM_END, add_special_tokens=False), np.int32)
    ids = np.concatenate([prompt, reply])
    mask = np.zeros(ids.shape, bool)
    mask[len(prompt) :] = True
    return ids, mask


def expand_image_tokens(ids: np.ndarray, grid_thw_list, image_pad_id: int, merge_size: int = 2) -> np.ndarray:
    """Repeats the k-th `image_pad_id` in `ids` [T] to t*h*w / merge_size**2 copies, where
    (t, h, w) = grid_thw_list[k] (patch grid of image k, [I, 3]). Returns [T'] in ids' dtype."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"expand_image_tokens: ids must be 1-D, got shape {ids.shape}")
    grids = np.asarray(grid_thw_list, np.int64).reshape(-1, 3)
    where = np.flatnonzero(ids == image_pad_id)
    if len(where) != len(grids):
        raise ValueError(
            f"expand_image_tokens: {len(where)} image pad tokens (id {image_pad_id}) but {len(grids)} image grids"
        )
    counts = np.ones(len(ids), np.int64)
    for k, (pos, (t, h, w)) in enumerate(zip(where, grids)):
        if h % merge_size or w % merge_size or min(t, h, w) < 1:
            raise ValueError(
                f"expand_image_tokens: grid {k} = {[int(t), int(h), int(w)]} not a merge_size={merge_size} grid"
            )
        counts[pos] = t * h * w // merge_size**2
    return np.repeat(ids, counts)
