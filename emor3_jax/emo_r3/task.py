"""EMO-R3 as a task: what the policy is asked (the SET prompt), how it judges its own answers
(the two reflection questions, spec section 4), and the reward's named components.

The GRPO step (rl/experience.py) and the evaluation reach the method only through a `Task`:

    prompt(encoder, record) -> Prompt            the rollout prompt of a record
    sft_example(encoder, record) -> example      prompt + reference answer (cold start)
    answer(response) -> str                      the parsed answer (evaluation's prediction)
    reflects                                     whether `reflect` must run before `score`
    prompt_length(encoder, record) -> (tokens, image tokens, image tokens at min_pixels)
    judge                                        "policy" | "reference": who answers reflections
    reflect(sampler, judge, encoder, ro, key=)   fills ro.*_answers
    score(response, label, text_answer, image_answer) -> {name: value}, "overall" included;
        never raises: a row it cannot score gets "error" (a message) and its values
    faithfulness(response, record) -> {name: bool} | None    ground-truth checks (None: no truth)
    faithfulness_rates(true_labels, flags) -> dict           their rates, overall and per class
    judge_sft_examples(encoder, records, seed, count) -> [example]  reflection questions to teach a judge
    judge_answers(sampler, judge, encoder, examples, key=) -> [str]

A new reward or task is one class with these members; the trainer, eval and metrics log
whatever components `score` returns.
"""

from __future__ import annotations

import dataclasses

import jax

from emor3_jax.core.batches import Prompt
from emor3_jax.core.multihost import to_host
from emor3_jax.data import prompts
from emor3_jax.data.encode import CUTS
from emor3_jax.emo_r3 import faithfulness as faith
from emor3_jax.emo_r3 import reflection_examples as reflection
from emor3_jax.emo_r3 import rewards
from emor3_jax.sampling.methods import GREEDY, SamplingParams

JUDGES = ("policy", "reference")
_PLACEHOLDER = "Answer 'None'"  # fills a reflection slot whose response gave no span (answer ignored)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reflection:
    """How the judge answers the reflection questions: sampled with `params`, up to `max_new`
    tokens."""

    max_new: int
    params: SamplingParams


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmoR3:
    """The EMO-R3 task. `reflects=False` scores without a judge (coherence = consistency = 1)."""

    labels: tuple[str, ...]
    reward: rewards.RewardConfig
    reflection: Reflection
    reflects: bool = True
    judge: str = "policy"
    use_set: bool = True  # False: the bare question (eval --plain)
    # emo_r3_code mode: how a reflection prompt over rl.max_prompt_len is cut (encode.CUTS).
    reflection_cut: str = "expanded"

    def __post_init__(self):
        if self.judge not in JUDGES:
            raise ValueError(f"judge must be one of {JUDGES}, got {self.judge!r}")
        if self.reflection_cut not in CUTS:
            raise ValueError(f"reflection_cut must be one of {CUTS}, got {self.reflection_cut!r}")

    @classmethod
    def from_config(cls, c, labels=None, use_set: bool = True) -> EmoR3:
        """From the run config's `reward` section (emo_r3_code mode answers up to
        rl.max_response_len); `labels` default to data.labels."""
        rc = c.reward
        return cls(
            labels=tuple(c.data.labels if labels is None else labels),
            reward=rewards.RewardConfig(
                compat=rc.compat,
                coherence_target=rc.coherence_target,
                reflection=rc.reflection,
                no_span=rc.no_span,
                w_accuracy=rc.w_accuracy,
                w_coherence=rc.w_coherence,
                w_consistency=rc.w_consistency,
                w_format=rc.w_format,
            ),
            reflection=Reflection(
                max_new=rc.reflection_max_tokens if rc.compat == "robust" else c.rl.max_response_len,
                params=SamplingParams(temperature=rc.reflection_temperature, top_p=rc.reflection_top_p),
            ),
            reflects=rc.reflection != "none",
            judge=rc.judge,
            use_set=use_set,
            reflection_cut=rc.reflection_cut,
        )

    # ---- what the policy is asked
    def question(self, encoder, record) -> str:
        q = encoder.question(record)
        return prompts.set_prompt(q) if self.use_set else q

    def prompt(self, encoder, record) -> Prompt:
        return encoder.record_prompt(record, self.question(encoder, record))

    def prompt_length(self, encoder, record) -> tuple[int, int, int]:
        """`prompt`'s length without building it (Encoder.prompt_length): the data set drops
        records whose prompt would exceed rl.max_prompt_len."""
        return encoder.prompt_length(record, self.question(encoder, record))

    def sft_example(self, encoder, record):
        return encoder.sft_example(record, prompts.set_prompt(encoder.question(record)))

    def answer(self, response: str) -> str:
        """The response's answer: its last boxed content ("None" if none)."""
        return rewards.extract_boxed(response)

    # ---- how it judges itself
    def reflect(self, sampler, judge, encoder, ro, *, key) -> None:
        """Asks `judge` the reflection questions reward.reflection runs about every response
        (fills ro.text_answers and ro.image_answers; None where a question is not asked). Each
        is sampled in batches of exactly R prompts (a response without a span gets a placeholder
        question, its answer dropped), so every step runs the same compiled programs. A question
        over rl.max_prompt_len is cut on the right in emo_r3_code mode (the official run; the
        end of the question goes; `reflection_cut` says whether the image counts as one token,
        as there, or in full); in robust mode its quoted reasoning is shortened instead."""
        answers = {}
        r = self.reflection
        for side, k in zip(("text", "image"), jax.random.split(key)):
            if not rewards.runs(self.reward.reflection, side):
                answers[side] = [None] * len(ro.responses)
                continue
            qs, ps = [], []
            for row, response in enumerate(ro.responses):
                q, p = self._reflection_prompt(encoder, side, response, ro.prompts[row // ro.n])
                qs.append(q)
                ps.append(p)
            out = sampler.generate(judge, ps, key=k, max_new_tokens=r.max_new, params=r.params)
            texts = encoder.decode(to_host(out.tokens), to_host(out.lengths))
            answers[side] = [t if q is not None else None for t, q in zip(texts, qs)]
        ro.text_answers, ro.image_answers = answers["text"], answers["image"]

    def _reflection_prompt(self, encoder, side: str, response: str, src: Prompt) -> tuple[str | None, Prompt]:
        """The `side` question about `response` (None: not asked) and the prompt sampled for it."""
        what = f"{side} reflection"
        pixels, grid = (None, None) if side == "text" else (src.pixel_values, src.image_grid_thw)
        if self.reward.compat == "emo_r3_code":
            if side == "text":
                q = rewards.text_reflection_prompt(response, self.labels, "emo_r3_code")
            else:
                q = rewards.image_reflection_prompt(response, "emo_r3_code")
            return q, encoder.prompt(q, pixels, grid, what, cut=self.reflection_cut)
        if side == "text":
            span = rewards.text_span(response)
            build = lambda quoted: rewards.text_reflection_question(quoted, self.labels)
        else:
            span = rewards.image_span(response)
            build = rewards.image_reflection_question
        if not span:
            placeholder = _PLACEHOLDER if side == "text" else "<image>\n" + _PLACEHOLDER
            return None, encoder.prompt(placeholder, pixels, grid, what)
        q = _fit(encoder, build, span, grid, what)
        return q, encoder.prompt(q, pixels, grid, what)

    # ---- the reward
    def score(self, response: str, label: str, text_answer: str | None, image_answer: str | None) -> dict:
        """The Reflective Emotional Reward's components (emo_r3/rewards.py). Never raises: a
        malformed row scores 0 with an "error" entry, which the step counts and logs."""
        if self.reflects:
            return rewards.safe_score(response, label, text_answer, image_answer, self.reward)
        return rewards.safe_score_without_reflection(response, label, self.reward)

    # ---- what no judge is needed for: the data set's truth
    def faithfulness(self, response: str, record: dict) -> dict[str, bool] | None:
        """{"image_faithful", "answer_coherent"} of `response` to `record` (emo_r3/faithfulness.py),
        or None when the record carries no truth (real data sets do not know what is drawn)."""
        if not record.get("truth"):
            return None
        return faith.score(response, faith.parse_truth(record["truth"]), self.labels)

    def faithfulness_rates(self, true_labels, flags) -> dict:
        """Rates of `faithfulness` results, overall and per true label (faithfulness.aggregate)."""
        return faith.aggregate(true_labels, flags)

    # ---- teaching and measuring a judge (the synthetic truth writes the answers)
    def judge_sft_examples(self, encoder, records, seed: int, count: int) -> list:
        """`count` reflection questions with their answers, as SFT examples (encoder.sft_pair):
        question j asks about record j % R (R = len(records)) the kind (j // R + j + seed) % 4
        in reflection_examples' order (text, text with another label's feeling, image matching,
        image with a wrong detail), so the kinds come in turn, a record asked several times meets
        several kinds, and, with `seed` the step, each record meets every kind over the steps."""
        examples = reflection.reflection_examples(records, self.labels, seed)
        per_record, n = len(examples) // len(records), len(records)
        chosen = [examples[per_record * (j % n) + (j // n + j + seed) % per_record] for j in range(count)]
        return [encoder.sft_pair(ex.prompt, ex.target, _image_of(ex)) for ex in chosen]

    def judge_answers(self, sampler, judge, encoder, examples, *, key) -> list[str]:
        """`judge`'s greedy answers to reflection examples (reflection_examples.ReflectionExample)
        at the reflection length; text and image questions go in separate calls, as in `reflect`."""
        answers = [""] * len(examples)
        for k, uses_image in enumerate((False, True)):
            rows = [i for i, ex in enumerate(examples) if ex.uses_image == uses_image]
            if not rows:
                continue
            ps = []
            for i in rows:
                image = _image_of(examples[i])
                pixels, grid = encoder.image(image) if image else (None, None)
                ps.append(encoder.prompt(examples[i].prompt, pixels, grid, "judge question"))
            out = sampler.generate(
                judge,
                ps,
                key=jax.random.fold_in(key, k),
                max_new_tokens=self.reflection.max_new,
                params=GREEDY,
            )
            for i, text in zip(rows, encoder.decode(to_host(out.tokens), to_host(out.lengths))):
                answers[i] = text
        return answers


def longest_reflection_prompt(c) -> int:
    """The most tokens a reflection prompt of run config `c` takes in the sampler. A prompt
    over rl.max_prompt_len (L) is cut to L, except an image reflection cut with its image
    counted as one token (reward.reflection_cut="unexpanded", emo_r3_code mode): L - 1 tokens
    besides the image, plus the image of a record whose own prompt fit L beside at least its
    two vision markers (at most L - 2 tokens): 2L - 3."""
    r, limit = c.reward, c.rl.max_prompt_len
    grows = r.compat == "emo_r3_code" and r.reflection_cut == "unexpanded" and rewards.runs(r.reflection, "image")
    return 2 * limit - 3 if grows else limit


def _image_of(example) -> dict | None:
    """The record-like image source of a reflection example (None: a text question)."""
    return {"id": example.record_id, "image": example.image} if example.uses_image else None


def _fit(encoder, build, span: str, grid, what: str) -> str:
    """build(span) with `span` cut from its end, token by token, until the prompt fits
    rl.max_prompt_len: the quoted reasoning is shortened, the question stays whole."""
    q, keep = build(span), None
    while (excess := len(encoder.prompt_ids(q, grid)) - encoder.max_prompt_len) > 0:
        tokens = encoder.tok.encode(span, add_special_tokens=False)
        if not tokens:
            raise ValueError(f"{what}: the question alone exceeds rl.max_prompt_len={encoder.max_prompt_len}")
        # Decoding a cut and encoding it again may not give back the same count: always shorten.
        keep = max(0, min(len(tokens) - excess, len(tokens) - 1 if keep is None else keep - 1))
        span = encoder.tok.decode(tokens[:keep])
        q = build(span)
    return q
