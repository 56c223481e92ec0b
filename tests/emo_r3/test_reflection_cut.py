"""Reflection prompts over rl.max_prompt_len: emo_r3_code cuts them on the right (the official
run, spec section 5); robust shortens the quoted reasoning and keeps the question whole."""

import pytest

from emor3_jax.core.batches import Prompt
from emor3_jax.data.encode import Encoder
from emor3_jax.data.processing import ImageProcessor
from emor3_jax.data.tokenizers import build_test_tokenizer, special_token_ids
from emor3_jax.emo_r3 import rewards
from emor3_jax.emo_r3.task import EmoR3, Reflection
from emor3_jax.models.api import preset
from emor3_jax.sampling.methods import GREEDY

LABELS = ("awe", "fear")
LONG = "<step1>" + "a storm over the sea " * 100 + "</step1><step2>afraid</step2><step3>neg</step3>\\boxed{fear}"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    tok = build_test_tokenizer(str(tmp_path_factory.mktemp("tok")))
    cfg = preset("tiny", vocab_size=len(tok), special_ids=special_token_ids(tok))
    enc = Encoder(tok, ImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56), cfg, LABELS, 10**6)
    # The limit: the question with 30 tokens of quoted reasoning (LONG quotes far more).
    enc.max_prompt_len = len(enc.prompt_ids(rewards.text_reflection_question("", LABELS))) + 30
    return enc


def _task(compat):
    cfg = rewards.RewardConfig(compat=compat)
    return EmoR3(labels=LABELS, reward=cfg, reflection=Reflection(max_new=8, params=GREEDY))


def test_official_mode_keeps_the_first_max_prompt_len_tokens(encoder):
    q, p = _task("emo_r3_code")._reflection_prompt(encoder, "text", LONG, Prompt(None))
    full = encoder.prompt_ids(q)
    assert len(full) > encoder.max_prompt_len  # the uncut prompt would not fit
    assert (
        p.ids.tolist() == full[: encoder.max_prompt_len].tolist()
    )  # cut on the right (a left cut keeps full[-limit:])


def test_robust_mode_shortens_the_reasoning_and_keeps_the_question(encoder):
    q, p = _task("robust")._reflection_prompt(encoder, "text", LONG, Prompt(None))
    assert len(p.ids) <= encoder.max_prompt_len
    assert q.endswith(
        "Which emotion best describes the text above?\n"
        "Answer the question using one emotional category (one word only): awe, fear."
    )
    assert q.startswith("<step1>a storm") and len(q) < len(rewards.text_span(LONG))
