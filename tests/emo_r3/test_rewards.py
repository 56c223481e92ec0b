"""The reflective emotional reward on hand-written responses, in both compat modes.

Every rule and every quirk of the official scoring listed in the spec (section 4) has a
case; expected numbers are written out, with the wrong answer a plausible bug would give.
"""

import pytest

from emor3_jax.emo_r3 import rewards as R
from emor3_jax.emo_r3.rewards import RewardConfig

OFFICIAL = "emo_r3_code"
ROBUST = "robust"
LABELS = ("amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness")
STEPS = (
    "<step1>A vast canyon at sunset.</step1>\n"
    "<step2>One would feel small and amazed.</step2>\n"
    "<step3>Positive, low arousal.</step3>\n"
)
GOOD = STEPS + "\\boxed{awe}"


# ---------------------------------------------------------------------------- config


def test_config_defaults():
    cfg = RewardConfig()
    assert (cfg.compat, cfg.coherence_target) == ("robust", "label")
    assert (cfg.w_accuracy, cfg.w_coherence, cfg.w_consistency, cfg.w_format) == (0.8, 0.1, 0.1, 0.1)


@pytest.mark.parametrize(
    "kwargs, quoted",
    [
        (dict(compat="official"), "'official'"),
        (dict(coherence_target="answer"), "'answer'"),
        (dict(w_accuracy=-0.1), "-0.1"),
        (dict(w_format=float("nan")), "nan"),
        (dict(w_coherence="0.1"), "'0.1'"),
        (dict(w_consistency=True), "True"),
    ],
)
def test_config_rejects_bad_values_quoting_them(kwargs, quoted):
    with pytest.raises(ValueError, match=quoted):
        RewardConfig(**kwargs)


# ---------------------------------------------------------------------------- box


@pytest.mark.parametrize(
    "text, want",
    [
        ("\\boxed{awe}", "awe"),
        ("\\boxed{  Awe \n}", "Awe"),  # stripped, case kept
        ("\\boxed{fear} then \\boxed{awe}", "awe"),  # last box, not first ("fear")
        ("\\boxed{\\text{awe}}", "\\text{awe}"),  # not unwrapped
        ("\\boxed{a{b}c}", "a{b}c"),  # nested braces counted, not "a{b"
        ("\\boxed{a{b{c}}d} tail}", "a{b{c}}d"),
        ("\\boxed {awe}", "None"),  # a space: not a box
        ("\\boxed{awe} and \\boxed{fear", "None"),  # last box unclosed, earlier closed
        ("\\boxed{a{b}", "None"),  # nested brace never balanced
        ("no box at all", "None"),
        ("\\boxed{}", ""),
        ("boxed{awe}", "None"),  # the backslash is part of the marker
    ],
)
def test_extract_boxed(text, want):
    assert R.extract_boxed(text) == want


# ---------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "response, want",
    [
        (GOOD, 1.0),
        (GOOD + " Done.", 1.0),  # text after the box is allowed
        ("Intro. " + GOOD, 0.0),  # fullmatch: must start with <step1>
        ("\n  " + GOOD, 1.0),  # ...but whitespace before "<" is removed by the re.sub
        ("< step1 >a< / step1 > <step2 >b</ step2>\n<step3>c</step3 > \\boxed{x}", 1.0),  # spaces at tags
        ("<step1>a</step1><step2>b</step2><step3>c</step3>\\boxed{}", 1.0),  # empty box still a box
        ("<step1>a</step1><step2>b</step2><step3>c</step3>\\boxed{x", 0.0),  # box never closed
        ("<step1>a</step1><step2>b</step2><step3>c</step3>\\boxed {x}", 0.0),  # not a box
        ("<step1>a</step1><step2>b</step2><step3>c</step3> awe", 0.0),  # no box
        ("<step1>a</step1><step3>c</step3>\\boxed{x}", 0.0),  # missing step2
        ("<step2>b</step2><step1>a</step1><step3>c</step3>\\boxed{x}", 0.0),  # wrong order
        ("<step1>a</step1>\\boxed{x}<step2>b</step2><step3>c</step3>", 0.0),  # box before step3
        ("<step1>a</step1>\n\n<step2>b\nb</step2>\n<step3>c</step3>\n\\boxed{x}\n", 1.0),  # DOTALL
        ("<step1>a</step1><step2>b</step2><step3>c</step3>boxed{x}", 0.0),  # literal backslash needed
    ],
)
def test_format_score(response, want):
    assert R.format_score(response) == want


# ---------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    "response, label, want",
    [
        (GOOD, "awe", 1.0),
        (STEPS + "\\boxed{AWE}", "awe", 1.0),  # case-insensitive
        (STEPS + "\\boxed{awe}", "Awe", 1.0),
        (STEPS + "\\boxed{ awe }", "awe", 1.0),  # box content stripped
        (STEPS + "\\boxed{awe.}", "awe", 0.0),  # no punctuation removal
        (STEPS + "\\boxed{\\text{awe}}", "awe", 0.0),
        (STEPS + "\\boxed{awe} \\boxed{fear}", "awe", 0.0),  # the last box counts
        (STEPS + "\\boxed{awe} \\boxed{fear", "awe", 0.0),  # last unclosed -> "None"
        (STEPS + "\\boxed {awe}", "awe", 0.0),
        (STEPS + "awe", "awe", 0.0),
        (STEPS + "no box", "none", 1.0),  # "None" lower-cased equals a label "none"
    ],
)
def test_accuracy_score(response, label, want):
    assert R.accuracy_score(response, label) == want


# ---------------------------------------------------------------------------- spans and prompts


def test_spans():
    assert R.text_span(GOOD) == (
        "<step1>A vast canyon at sunset.</step1>\n<step2>One would feel small and amazed.</step2>"
    )
    assert R.image_span(GOOD) == "<step1>A vast canyon at sunset.</step1>"  # stripped of "\n"
    # first match, non-greedy: the second <step1>..</step2> pair is not included
    two = "  <step1>a</step2> x <step1>b</step2>"
    assert R.text_span(two) == "<step1>a</step2>"
    # image span runs to the first <step2>, with no </step1> needed
    assert R.image_span("<step1> scene <step2>feel</step2>") == "<step1> scene"
    assert R.text_span("<step1>a</step1> no step two") == ""
    assert R.image_span("<step1>a</step1> no step two") == ""
    assert R.text_span("") == R.image_span("") == ""


def test_text_reflection_prompt_text():
    want = (
        "<step1>A vast canyon at sunset.</step1>\n<step2>One would feel small and amazed.</step2>\n"
        "Which emotion best describes the text above?\n"
        "Answer the question using one emotional category (one word only): "
        "amusement, anger, awe, contentment, disgust, excitement, fear, sadness."
    )
    assert R.text_reflection_prompt(GOOD, LABELS, OFFICIAL) == want
    assert R.text_reflection_prompt(GOOD, LABELS, ROBUST) == want
    six = ("anger", "disgust", "fear", "joy", "sadness", "surprise")
    assert R.text_reflection_prompt(GOOD, six, ROBUST).endswith(
        "(one word only): anger, disgust, fear, joy, sadness, surprise."
    )


def test_image_reflection_prompt_text():
    want = (
        "<image>\nCan the following text describe the image?Please answer with yes or no."
        "<step1>A vast canyon at sunset.</step1>"
    )
    assert R.image_reflection_prompt(GOOD, OFFICIAL) == want
    assert R.image_reflection_prompt(GOOD, ROBUST) == want


def test_empty_spans_official_asks_none_robust_does_not_ask():
    bad = "I think it is \\boxed{awe}"
    assert R.text_reflection_prompt(bad, LABELS, OFFICIAL) == "Answer 'None'"
    assert R.image_reflection_prompt(bad, OFFICIAL) == "<image>\nAnswer 'None'"
    assert R.text_reflection_prompt(bad, LABELS, ROBUST) is None
    assert R.image_reflection_prompt(bad, ROBUST) is None


def test_prompts_reject_bad_arguments():
    with pytest.raises(ValueError, match="'strict'"):
        R.text_reflection_prompt(GOOD, LABELS, "strict")
    with pytest.raises(ValueError, match="'strict'"):
        R.image_reflection_prompt(GOOD, "strict")
    with pytest.raises(ValueError, match="non-empty"):
        R.text_reflection_prompt(GOOD, (), ROBUST)
    with pytest.raises(ValueError, match="non-empty"):
        R.text_reflection_prompt(GOOD, "awe", ROBUST)  # a string, not a list of labels


# ---------------------------------------------------------------------------- coherence


@pytest.mark.parametrize(
    "answer, target, official, robust",
    [
        ("awe", "awe", 1.0, 1.0),
        ("Awe", "awe", 1.0, 1.0),  # case-insensitive in both
        ("awe", "Awe", 1.0, 1.0),
        ("fear", "awe", 0.0, 0.0),
        ("Awe.", "awe", 0.0, 1.0),  # official: unstripped, punctuation kept
        ("awe\n", "awe", 0.0, 1.0),
        (" awe ", "awe", 0.0, 1.0),
        ("**Awe**", "awe", 0.0, 1.0),
        ("The emotion is awe.", "awe", 0.0, 1.0),  # 4 words: short
        ("It evokes a sense of awe", "awe", 0.0, 0.0),  # 6 words: too long to search
        ("awesome", "awe", 0.0, 0.0),  # a word, not a substring
        ("None", "awe", 0.5, 0.5),
        ("none", "awe", 0.5, 0.5),
        ("NONE", "awe", 0.5, 0.5),
        ("", "awe", 0.5, 0.5),
        (" None", "awe", 0.0, 0.5),  # official: "none" only when unstripped
        ("None.", "awe", 0.0, 0.5),
        ("  \n", "awe", 0.0, 0.5),
    ],
)
def test_coherence_score(answer, target, official, robust):
    assert R.coherence_score(answer, target, OFFICIAL) == official
    assert R.coherence_score(answer, target, ROBUST) == robust


def test_coherence_short_answer_limit():
    assert R.SHORT_ANSWER_WORDS == 5
    assert R.coherence_score("I would say awe here", "awe", ROBUST) == 1.0  # 5 words
    assert R.coherence_score("I would say it is awe", "awe", ROBUST) == 0.0  # 6 words
    assert R.coherence_score("Sadness, not awe at all", "awe", ROBUST) == 1.0  # documented limit


def test_coherence_not_asked():
    assert R.coherence_score(None, "awe", ROBUST) == 0.5  # robust: not asked (empty span)
    assert R.coherence_score(None, "awe", OFFICIAL) == 1.0  # official: the reflection did not run


# ---------------------------------------------------------------------------- consistency


@pytest.mark.parametrize(
    "answer, official, robust",
    [
        ("yes", 1.0, 1.0),
        ("Yes.", 1.0, 1.0),
        ("YES, it can.", 1.0, 1.0),
        ("no", 0.0, 0.0),
        ("No, it cannot.", 0.0, 0.0),
        ("yes and no", 1.0, 1.0),  # official: "yes" checked first; robust: first word is yes
        ("No and yes", 1.0, 0.0),  # official: any "yes" wins; robust: the first word
        ("None", 0.0, 0.5),  # official: substring "no"
        ("not really", 0.0, 0.5),
        ("I don't know", 0.0, 0.5),  # "know" contains "no"
        ("It cannot", 0.0, 0.5),  # "cannot" contains "no"
        ("eyes", 1.0, 0.5),  # "eyes" contains "yes"
        ("maybe", 0.5, 0.5),
        ("", 0.5, 0.5),
    ],
)
def test_consistency_score(answer, official, robust):
    assert R.consistency_score(answer, OFFICIAL) == official
    assert R.consistency_score(answer, ROBUST) == robust


def test_consistency_not_asked():
    assert R.consistency_score(None, ROBUST) == 0.5
    assert R.consistency_score(None, OFFICIAL) == 1.0


def test_scores_reject_unknown_compat():
    with pytest.raises(ValueError, match="'x'"):
        R.coherence_score("awe", "awe", "x")
    with pytest.raises(ValueError, match="'x'"):
        R.consistency_score("yes", "x")


# ---------------------------------------------------------------------------- overall


def test_overall_maximum_is_1_1():
    for compat in (OFFICIAL, ROBUST):
        s = R.score(GOOD, "awe", "awe", "Yes", RewardConfig(compat=compat))
        assert s == pytest.approx(dict(overall=1.1, accuracy=1.0, format=1.0, coherence=1.0, consistency=1.0))


def test_overall_weighting():
    # wrong answer, good format, judge unsure of text, says no to image:
    # 0.8 * 0 + 0.1 * 0.5 + 0.1 * 0 + 0.1 * 1 = 0.15
    s = R.score(STEPS + "\\boxed{fear}", "awe", "None", "No", RewardConfig())
    assert s == pytest.approx(dict(overall=0.15, accuracy=0.0, format=1.0, coherence=0.5, consistency=0.0))
    # custom weights: 0.5 * 1 + 0.2 * 1 + 0.3 * 0.5 + 0 * 1 = 0.85
    cfg = RewardConfig(w_accuracy=0.5, w_coherence=0.2, w_consistency=0.3, w_format=0.0)
    assert R.score(GOOD, "awe", "awe", "maybe", cfg)["overall"] == pytest.approx(0.85)


def test_official_vs_robust_on_quirky_answers():
    # "Awe." and "I don't know": official 0.8 + 0 + 0 + 0.1 = 0.9; robust 0.8 + 0.1 + 0.05 + 0.1
    off = R.score(GOOD, "awe", "Awe.", "I don't know", RewardConfig(compat=OFFICIAL))
    rob = R.score(GOOD, "awe", "Awe.", "I don't know", RewardConfig(compat=ROBUST))
    assert off["overall"] == pytest.approx(0.9)
    assert rob["overall"] == pytest.approx(1.05)


def test_failed_extraction():
    bad = "It is clearly \\boxed{awe}"  # no steps: format 0, both spans empty
    # official: the judge is asked "Answer 'None'" and says "None": coherence 0.5, consistency 0
    off = R.score(bad, "awe", "None", "None", RewardConfig(compat=OFFICIAL))
    assert off == pytest.approx(dict(overall=0.85, accuracy=1.0, format=0.0, coherence=0.5, consistency=0.0))
    # robust: not asked; "neutral" (RewardConfig's default) 0.5 on both: 0.8 + 0.05 + 0.05 = 0.9
    rob = R.score(bad, "awe", None, None, RewardConfig())
    assert rob == pytest.approx(dict(overall=0.9, accuracy=1.0, format=0.0, coherence=0.5, consistency=0.5))
    # "zero": no reasoning to check: 0.8
    rob = R.score(bad, "awe", None, None, RewardConfig(no_span="zero"))
    assert rob == pytest.approx(dict(overall=0.8, accuracy=1.0, format=0.0, coherence=0.0, consistency=0.0))


@pytest.mark.parametrize("no_span, value", [("neutral", 0.5), ("zero", 0.0)])
def test_robust_no_span_scores_only_the_side_without_a_span(no_span, value):
    # Step 2 never closed: an image span (step 1), no text span (steps 1-2).
    half = "<step1> a pink ball </step1><step2> fun \\boxed{amusement}"
    s = R.score(half, "amusement", None, "yes", RewardConfig(no_span=no_span))
    assert s["coherence"] == value and s["consistency"] == 1.0
    # A side that does not run scores NOT_RUN whatever no_span says.
    s = R.score("\\boxed{awe}", "awe", None, None, RewardConfig(no_span=no_span, reflection="image"))
    assert s["coherence"] == R.NOT_RUN and s["consistency"] == value
    # emo_r3_code asks the judge about an empty span: no_span does not apply.
    s = R.score("\\boxed{awe}", "awe", "None", "None", RewardConfig(compat=OFFICIAL, no_span=no_span))
    assert s["coherence"] == 0.5 and s["consistency"] == 0.0


def test_no_span_must_be_known():
    with pytest.raises(ValueError, match="no_span must be one of"):
        RewardConfig(no_span="half")


def test_robust_score_rejects_answers_that_do_not_match_the_questions():
    with pytest.raises(ValueError, match="not asked"):
        R.score("\\boxed{awe}", "awe", "awe", None, RewardConfig())
    with pytest.raises(ValueError, match="asked but"):
        R.score(GOOD, "awe", None, "yes", RewardConfig())
    with pytest.raises(ValueError, match="asked but"):
        R.score(GOOD, "awe", "awe", None, RewardConfig())


@pytest.mark.parametrize("compat", [OFFICIAL, ROBUST])
def test_one_sided_reflection_scores_the_missing_side_one(compat):
    """A wrong answer (accuracy 0, format 1) judged "fear" by the text judge (coherence 0 vs
    label awe) and "no" by the image judge (consistency 0). Text only: consistency is 1
    (official missing side): 0 + 0.1 * 0 + 0.1 * 1 + 0.1 = 0.2 (0.1 if the missing side
    scored 0, 0.15 if 0.5). Image only: coherence 1: 0.1 + 0 + 0.1 = 0.2. None: both 1: 0.3."""
    wrong = STEPS + "\\boxed{fear}"
    text_only = R.score(wrong, "awe", "fear", None, RewardConfig(compat=compat, reflection="text"))
    assert text_only == pytest.approx(dict(overall=0.2, accuracy=0.0, format=1.0, coherence=0.0, consistency=1.0))
    image_only = R.score(wrong, "awe", None, "no", RewardConfig(compat=compat, reflection="image"))
    assert image_only == pytest.approx(dict(overall=0.2, accuracy=0.0, format=1.0, coherence=1.0, consistency=0.0))
    none = R.score(wrong, "awe", None, None, RewardConfig(compat=compat, reflection="none"))
    assert none == R.score_without_reflection(wrong, "awe", RewardConfig(compat=compat))
    assert none["overall"] == pytest.approx(0.3)


def test_official_reward_accepts_a_missing_answer_whatever_the_setting():
    # The official code scores any None answer 1 (it has no wiring check): with both
    # reflections set, a None image answer still gives consistency 1: 0.8 + 0.1 + 0.1 + 0.1.
    s = R.score(GOOD, "awe", "awe", None, RewardConfig(compat=OFFICIAL))
    assert s["consistency"] == 1.0 and s["overall"] == pytest.approx(1.1)


def test_robust_one_sided_reflection_rejects_an_answer_to_the_side_not_run():
    with pytest.raises(ValueError, match="image reflection was not asked"):
        R.score(GOOD, "awe", "awe", "yes", RewardConfig(reflection="text"))
    with pytest.raises(ValueError, match="reflection must be one of"):
        RewardConfig(reflection=True)


def test_coherence_target_own_answer():
    wrong = STEPS + "\\boxed{fear}"
    # the judge reads "fear" into the steps; label is awe
    by_label = R.score(wrong, "awe", "fear", "yes", RewardConfig(coherence_target="label"))
    by_own = R.score(wrong, "awe", "fear", "yes", RewardConfig(coherence_target="own_answer"))
    assert by_label["coherence"] == 0.0 and by_own["coherence"] == 1.0
    assert by_label["overall"] == pytest.approx(0.2)  # 0 + 0 + 0.1 + 0.1
    assert by_own["overall"] == pytest.approx(0.3)
    # official own_answer compares unstripped: "Fear" matches "fear", "fear." does not
    off = RewardConfig(compat=OFFICIAL, coherence_target="own_answer")
    assert R.score(wrong, "awe", "Fear", "yes", off)["coherence"] == 1.0
    assert R.score(wrong, "awe", "fear.", "yes", off)["coherence"] == 0.0
    # no box: the own answer is "None", nothing coheres with it
    nobox = STEPS + "fear"
    assert R.score(nobox, "awe", "fear", "yes", RewardConfig(coherence_target="own_answer"))["coherence"] == 0.0


def test_score_without_reflection():
    s = R.score_without_reflection(GOOD, "awe", RewardConfig())
    assert s == pytest.approx(dict(overall=1.1, accuracy=1.0, format=1.0, coherence=1.0, consistency=1.0))
    s = R.score_without_reflection("\\boxed{fear}", "awe", RewardConfig())
    assert s["overall"] == pytest.approx(0.2)  # 0 + 0.1 + 0.1 + 0


def test_safe_score_passes_through_good_input():
    cfg = RewardConfig()
    assert R.safe_score(GOOD, "awe", "awe", "yes", cfg) == R.score(GOOD, "awe", "awe", "yes", cfg)


def test_safe_score_catches_errors():
    s = R.safe_score(None, "awe", "awe", "yes", RewardConfig())  # not a string
    assert s["error"].startswith("TypeError")
    assert {k: s[k] for k in ("overall", "accuracy", "format", "coherence", "consistency")} == dict.fromkeys(
        ("overall", "accuracy", "format", "coherence", "consistency"), 0.0
    )
    s = R.safe_score(GOOD, "awe", None, "yes", RewardConfig())  # robust: asked, but no answer
    assert s["overall"] == 0.0 and s["error"].startswith("ValueError")
