"""EMO-R3's Reflective Emotional Reward (RER): rule scores on text, no jax.

For one response y with label l, and the policy's answers a_t (text reflection) and a_i
(image reflection):

    overall = w_acc * accuracy + w_coh * coherence + w_con * consistency + w_fmt * format

with the official weights 0.8, 0.1, 0.1, 0.1, so overall lies in [0, 1.1].

- format      1 if y, after re.sub(r"\\s*(<|>|/)\\s*", r"\\1", y), fully matches
              <step1>.*</step1>.*<step2>.*</step2>.*<step3>.*</step3>.*\\boxed{.*}.* (DOTALL).
- accuracy    1 if lower(last boxed content of y) == lower(l).
- coherence   a_t against the target (l, or y's own boxed answer): 0.5 for "none"/empty.
- consistency a_i as yes -> 1, no -> 0, neither -> 0.5.

Two compat modes:
- "emo_r3_code": bit-for-bit the official scoring, quirks included: coherence compares
  unstripped text ("Awe." scores 0); consistency tests substrings, "yes" first, so "None",
  "not", "know", "cannot" count as no and "yes and no" as yes; an empty span still asks the
  judge "Answer 'None'"; a reflection that was not run (answer None) scores 1.
- "robust" (default): coherence strips, lower-cases, drops surrounding punctuation and
  accepts the target as one word of a short answer (at most SHORT_ANSWER_WORDS words);
  consistency takes the first whole word "yes" or "no"; an empty span is not sent to the
  judge (its prompt is None) and that reflection scores NO_SPAN[no_span] (0.5 by default; the
  run config chooses).

`reflection` (REFLECTIONS) says which reflections run: "both", "text", "image" or "none". In
both modes a side that does not run scores 1, as the official reward scores a missing answer
(spec section 5), so "none" equals scoring without reflection.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

COMPATS = ("robust", "emo_r3_code")
COHERENCE_TARGETS = ("label", "own_answer")
REFLECTIONS = ("both", "text", "image", "none")  # the reflections that run
# Robust mode: what a reflection scores when the response has no span for it (nothing to ask the
# judge): "neutral" 0.5, or "zero" (no reasoning to check). docs/results.md "A response without spans".
NO_SPAN = {"neutral": 0.5, "zero": 0.0}
NOT_RUN = 1.0  # score of a reflection that does not run (the official code's missing answer)
# Robust coherence accepts the target as one word of an answer of at most this many
# words ("The emotion is awe." has 4); longer answers must equal the target.
SHORT_ANSWER_WORDS = 5
NEUTRAL = 0.5  # score of a reflection that says nothing (or was not asked)
_KEYS = ("overall", "accuracy", "format", "coherence", "consistency")

_BOX = "\\boxed{"
_TAG_SPACE = re.compile(r"\s*(<|>|/)\s*")
_FORMAT = re.compile(r"<step1>.*</step1>.*<step2>.*</step2>.*<step3>.*</step3>.*\\boxed\{.*\}.*", re.DOTALL)
_TEXT_SPAN = re.compile(r"(<step1>.*?</step2>)", re.DOTALL)
_IMAGE_SPAN = re.compile(r"(<step1>.*?)(?=<step2>)", re.DOTALL)
_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")
_WORD = re.compile(r"\w+")
_YES_NO = re.compile(r"\b(yes|no)\b")
_NONE_PROMPT = "Answer 'None'"
_IMAGE_QUESTION = "<image>\nCan the following text describe the image?Please answer with yes or no."


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """How responses are scored. Weights multiply the four components of `overall`."""

    compat: str = "robust"  # "robust" | "emo_r3_code" (bit-for-bit the official scoring)
    coherence_target: str = "label"  # "label" (official code) | "own_answer" (paper figure)
    reflection: str = "both"  # REFLECTIONS: the reflections that run; the others score NOT_RUN
    no_span: str = "neutral"  # NO_SPAN: robust mode's score of a reflection without a span to ask about
    w_accuracy: float = 0.8
    w_coherence: float = 0.1
    w_consistency: float = 0.1
    w_format: float = 0.1

    def __post_init__(self):
        _check_compat(self.compat)
        if self.coherence_target not in COHERENCE_TARGETS:
            raise ValueError(f"coherence_target must be one of {COHERENCE_TARGETS}, got {self.coherence_target!r}")
        if self.reflection not in REFLECTIONS:
            raise ValueError(f"reflection must be one of {REFLECTIONS}, got {self.reflection!r}")
        if self.no_span not in NO_SPAN:
            raise ValueError(f"no_span must be one of {tuple(NO_SPAN)}, got {self.no_span!r}")
        for name in ("w_accuracy", "w_coherence", "w_consistency", "w_format"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")


def _check_compat(compat: str) -> None:
    if compat not in COMPATS:
        raise ValueError(f"compat must be one of {COMPATS}, got {compat!r}")


# ----------------------------------------------------------------------------------------
# Rule scores on the response
# ----------------------------------------------------------------------------------------


def extract_boxed(text: str) -> str:
    """Content of the LAST exact `\\boxed{` up to its matching `}` (nested braces counted),
    stripped. "None" when there is no `\\boxed{` or the last one is never closed, even if an
    earlier box closed. `\\boxed {x}` is not a box; `\\boxed{\\text{awe}}` gives `\\text{awe}`.
    """
    start = text.rfind(_BOX)
    if start == -1:
        return "None"
    content = text[start + len(_BOX) :]
    depth = 0
    for i, ch in enumerate(content):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == -1:
                return content[:i].strip()
    return "None"


def format_score(response: str) -> float:
    """1.0 if the response, with spaces around `<`, `>`, `/` removed, fully matches
    `<step1>.*</step1>.*<step2>.*</step2>.*<step3>.*</step3>.*\\boxed\\{.*\\}.*` (DOTALL).
    Being a full match, the response must open with `<step1>` (leading spaces are removed)."""
    return 1.0 if _FORMAT.fullmatch(_TAG_SPACE.sub(r"\1", response)) else 0.0


def accuracy_score(response: str, label: str) -> float:
    """1.0 if lower(extract_boxed(response)) == lower(label), else 0.0 (no other cleaning)."""
    return 1.0 if extract_boxed(response).lower() == label.lower() else 0.0


# ----------------------------------------------------------------------------------------
# Reflection prompts
# ----------------------------------------------------------------------------------------


def text_span(response: str) -> str:
    """Steps 1-2, the text the coherence judge reads: first `(<step1>.*?</step2>)` (DOTALL),
    stripped; "" if none."""
    m = _TEXT_SPAN.search(response)
    return m.group(1).strip() if m else ""


def image_span(response: str) -> str:
    """Step 1, the scene description the consistency judge checks against the image:
    `(<step1>.*?)(?=<step2>)` (DOTALL), stripped; "" if none."""
    m = _IMAGE_SPAN.search(response)
    return m.group(1).strip() if m else ""


def text_reflection_prompt(response: str, labels: Sequence[str], compat: str) -> str | None:
    """The text-only coherence question about the response's steps 1-2:

        {text span}
        Which emotion best describes the text above?
        Answer the question using one emotional category (one word only): {l1, l2, ...}.

    The data set's labels fill the list in both modes (the official code hard-codes
    EmoSet-8). Empty span: "Answer 'None'" (emo_r3_code) or None, i.e. do not ask (robust).
    """
    _check_compat(compat)
    if isinstance(labels, str) or not labels:
        raise ValueError(f"labels must be a non-empty sequence of label strings, got {labels!r}")
    span = text_span(response)
    if not span:
        return _NONE_PROMPT if compat == "emo_r3_code" else None
    return text_reflection_question(span, labels)


def text_reflection_question(span: str, labels: Sequence[str]) -> str:
    """The coherence question quoting `span` (see `text_reflection_prompt`)."""
    return (
        f"{span}\nWhich emotion best describes the text above?\n"
        f"Answer the question using one emotional category (one word only): {', '.join(labels)}."
    )


def image_reflection_prompt(response: str, compat: str) -> str | None:
    """The image consistency question about the response's step 1 (no spaces between the
    sentences, as in the official code):

        <image>
        Can the following text describe the image?Please answer with yes or no.{image span}

    Empty span: "<image>\\nAnswer 'None'" (emo_r3_code) or None, i.e. do not ask (robust).
    """
    _check_compat(compat)
    span = image_span(response)
    if not span:
        return "<image>\n" + _NONE_PROMPT if compat == "emo_r3_code" else None
    return image_reflection_question(span)


def image_reflection_question(span: str) -> str:
    """The consistency question quoting `span` (see `image_reflection_prompt`)."""
    return _IMAGE_QUESTION + span


# ----------------------------------------------------------------------------------------
# Reflection scores
# ----------------------------------------------------------------------------------------


def _normalize(text: str) -> str:
    """Lower-cased, without surrounding whitespace or punctuation: "**Awe.**\\n" -> "awe"."""
    return _EDGE_PUNCT.sub("", text.lower())


def coherence_score(answer: str | None, target: str, compat: str) -> float:
    """Does the text judge's emotion equal the target?

    emo_r3_code: None (the text reflection did not run) -> 1; 0.5 if answer == "" or
                 lower(answer) == "none"; else 1 if lower(answer) == lower(target); else 0
                 (nothing stripped).
    robust: None (judge not asked) -> 0.5; n = normalize(answer); 0.5 if n in ("", "none");
            1 if n == normalize(target), or the answer has <= SHORT_ANSWER_WORDS words and
            one of them is normalize(target); else 0.
    """
    _check_compat(compat)
    if compat == "emo_r3_code":
        if answer is None:
            return NOT_RUN
        if answer == "" or answer.lower() == "none":
            return NEUTRAL
        return 1.0 if answer.lower() == target.lower() else 0.0
    if answer is None:
        return NEUTRAL
    norm, want = _normalize(answer), _normalize(target)
    if norm in ("", "none"):
        return NEUTRAL
    if norm == want:
        return 1.0
    words = _WORD.findall(norm)
    return 1.0 if len(words) <= SHORT_ANSWER_WORDS and want in words else 0.0


def consistency_score(answer: str | None, compat: str) -> float:
    """Does the image judge say the scene description fits the image?

    emo_r3_code: None (the image reflection did not run) -> 1; 1 if "yes" in lower(answer)
                 (checked first); else 0 if "no" in lower(answer) (so "None", "not", "know",
                 "cannot" are no); else 0.5.
    robust: None (judge not asked) -> 0.5; else the first whole word yes/no decides
            (1 / 0); neither -> 0.5.
    """
    _check_compat(compat)
    if compat == "emo_r3_code":
        if answer is None:
            return NOT_RUN
        low = answer.lower()
        if "yes" in low:
            return 1.0
        return 0.0 if "no" in low else NEUTRAL
    if answer is None:
        return NEUTRAL
    m = _YES_NO.search(answer.lower())
    if m is None:
        return NEUTRAL
    return 1.0 if m.group(1) == "yes" else 0.0


# ----------------------------------------------------------------------------------------
# Overall
# ----------------------------------------------------------------------------------------


def _combine(accuracy: float, fmt: float, coherence: float, consistency: float, cfg: RewardConfig) -> dict[str, float]:
    overall = (
        cfg.w_accuracy * accuracy + cfg.w_coherence * coherence + cfg.w_consistency * consistency + cfg.w_format * fmt
    )
    return dict(overall=overall, accuracy=accuracy, format=fmt, coherence=coherence, consistency=consistency)


def _check_asked(answer: str | None, asked: bool, which: str) -> None:
    # An answer without a question (or the reverse) means the caller's wiring is off.
    if asked and answer is None:
        raise ValueError(f"the {which} reflection was asked but its answer is None")
    if not asked and answer is not None:
        raise ValueError(
            f"the {which} reflection was not asked (empty span, or reward.reflection leaves it out) "
            f"but an answer was given: {answer!r}"
        )


def runs(reflection: str, side: str) -> bool:
    """Whether the `side` ("text" | "image") reflection runs under `reflection` (REFLECTIONS)."""
    return reflection in ("both", side)


def score(
    response: str, label: str, text_answer: str | None, image_answer: str | None, cfg: RewardConfig
) -> dict[str, float]:
    """All reward components of one response and `overall` (module docstring).

    text_answer / image_answer: the judge's decoded answers; None where the reflection does
    not run (cfg.reflection), which scores NOT_RUN, or where the robust prompt was None
    (empty span), which scores NO_SPAN[cfg.no_span]. Coherence is scored against `label` or, with
    coherence_target="own_answer", against the response's own boxed answer.
    Raises ValueError when an answer is given for a question that was not asked, or missing
    for one that was (robust mode; the official code has no such check).
    """
    target = label if cfg.coherence_target == "label" else extract_boxed(response)
    values = {}
    for side, answer in (("text", text_answer), ("image", image_answer)):
        run = runs(cfg.reflection, side)
        span = True  # emo_r3_code asks the judge about an empty span too
        if cfg.compat == "robust":
            span = bool(text_span(response) if side == "text" else image_span(response))
            _check_asked(answer, run and span, side)
        if not run:
            values[side] = NOT_RUN
        elif not span:
            values[side] = NO_SPAN[cfg.no_span]
        elif side == "text":
            values[side] = coherence_score(answer, target, cfg.compat)
        else:
            values[side] = consistency_score(answer, cfg.compat)
    return _combine(accuracy_score(response, label), format_score(response), values["text"], values["image"], cfg)


def score_without_reflection(response: str, label: str, cfg: RewardConfig) -> dict[str, float]:
    """Validation scoring: no judge, coherence = consistency = 1."""
    return _combine(accuracy_score(response, label), format_score(response), 1.0, 1.0, cfg)


def safe_score(
    response: str, label: str, text_answer: str | None, image_answer: str | None, cfg: RewardConfig
) -> dict[str, float | str]:
    """`score`, but any exception gives all-zero components plus "error" (the exception's
    type and message), so one malformed sample is counted and logged instead of ending a run."""
    return _guarded(score, response, label, text_answer, image_answer, cfg)


def safe_score_without_reflection(response: str, label: str, cfg: RewardConfig) -> dict[str, float | str]:
    """`score_without_reflection` with the same error handling as `safe_score`."""
    return _guarded(score_without_reflection, response, label, cfg)


def _guarded(fn, *args) -> dict[str, float | str]:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any failure of one sample must not stop training
        zeros: dict[str, float | str] = dict.fromkeys(_KEYS, 0.0)
        zeros["error"] = f"{type(e).__name__}: {e}"
        return zeros
