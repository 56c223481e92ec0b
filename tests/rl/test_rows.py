"""Host-side pieces of a GRPO step: reward scoring in the thread pool and the training rows."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from emor3_jax.emo_r3 import rewards
from emor3_jax.emo_r3.task import EmoR3, Reflection
from emor3_jax.rl.rows import score_async
from emor3_jax.sampling.methods import GREEDY
from emor3_jax.sampling.rollout import Rollouts


def _task(cfg: rewards.RewardConfig, reflection: bool) -> EmoR3:
    return EmoR3(
        labels=("excitement", "fear"),
        reward=cfg,
        reflection=Reflection(max_new=8, params=GREEDY),
        reflects=reflection,
    )


GOOD = "<step1>a red star</step1><step2>thrilled</step2><step3>positive, high</step3> \\boxed{excitement}"


def _rollouts(responses, labels, n):
    records = [{"id": str(i), "label": label} for i, label in enumerate(labels)]
    r = len(responses)
    return Rollouts(
        records=records,
        prompts=[],
        n=n,
        tokens=np.zeros((r, 4), np.int32),
        lengths=np.full((r,), 4),
        old_logp=None,
        responses=responses,
    )


def test_scores_follow_the_spec_and_an_exception_scores_zero_and_is_reported():
    ro = _rollouts([GOOD, None, "no box at all", GOOD], ["excitement", "fear"], n=2)
    ro.text_answers = ["excitement", None, None, "Fear."]
    ro.image_answers = ["yes", None, None, "no"]
    cfg = rewards.RewardConfig()
    with ThreadPoolExecutor(2) as pool:
        scores = [f.result() for f in score_async(pool, ro, _task(cfg, reflection=True).score)]
    # row 0: accuracy 1, format 1, coherence 1, consistency 1 -> 0.8 + 0.1 + 0.1 + 0.1
    assert scores[0]["overall"] == pytest.approx(1.1)
    # row 1: the response is not a string: zero reward, the error kept for the log
    assert scores[1]["overall"] == 0.0 and "error" in scores[1]
    # row 2: no spans, the judge was not asked (robust: 0.5 each), no box, no format
    assert scores[2]["overall"] == pytest.approx(0.1 * 0.5 + 0.1 * 0.5)
    # row 3: wrong label (fear vs excitement): coherence to the label "fear" is 1, consistency "no" is 0
    assert scores[3]["accuracy"] == 0.0 and scores[3]["coherence"] == 1.0 and scores[3]["consistency"] == 0.0


def test_without_reflection_coherence_and_consistency_are_one():
    ro = _rollouts([GOOD, GOOD], ["excitement"], n=2)
    with ThreadPoolExecutor(1) as pool:
        scores = [f.result() for f in score_async(pool, ro, _task(rewards.RewardConfig(), reflection=False).score)]
    assert scores[0]["coherence"] == scores[0]["consistency"] == 1.0
    assert scores[0]["overall"] == pytest.approx(1.1)
