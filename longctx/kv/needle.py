"""Evaluation texts from the built-in corpus: needle-in-a-haystack prompts, perplexity windows, calibration text.

The King James Bible (``longctx.data.load_text``, one verse a line) is split by lines into three disjoint
regions, so that TriAttention is never calibrated on the text it is evaluated on:
``calibration`` (first 10%), ``needle`` (10–70%, haystacks) and ``perplexity`` (70–100%).

A needle is one sentence ``"The secret code of <city> is <6-digit number>."`` put between two verses at the
asked depth of the haystack; the question after the haystack asks for the code of that city.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from torch import Tensor

REGIONS = {"calibration": (0.0, 0.1), "needle": (0.1, 0.7), "perplexity": (0.7, 1.0)}

CITIES = ("Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Dublin", "Quito", "Tbilisi", "Accra", "Riga", "Manila",
          "Havana", "Kyoto", "Porto", "Dakar", "Bergen", "Tunis", "Seville", "Krakow", "Montreal", "Perth", "Cusco",
          "Valparaiso", "Tallinn", "Zagreb", "Muscat", "Bogota", "Almaty", "Hobart", "Marseille", "Gdansk", "Leipzig")

QUESTION = "What is the secret code of {key} mentioned in the text above?"
ANSWER_PREFIX = "The secret code of {key} is"


def corpus_region(text: str, region: str) -> list[str]:
    """The lines (with their newlines) of ``region`` of ``text``: ``calibration``, ``needle`` or ``perplexity``."""
    if region not in REGIONS:
        raise ValueError(f"unknown corpus region {region!r}; expected one of {', '.join(REGIONS)}")
    lines = text.splitlines(keepends=True)
    lo, hi = REGIONS[region]
    return lines[int(lo * len(lines)):int(hi * len(lines))]


def take_tokens(tokenizer, lines: list[str], start: int, n_tokens: int) -> Tensor:
    """The first ``n_tokens`` token ids ``[n_tokens]`` of the text made of ``lines[start:]`` (wrapping around)."""
    text, i = "", start
    while True:
        text += "".join(lines[(i + j) % len(lines)] for j in range(64))
        i += 64
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens])


@dataclass
class NeedleSample:
    """One needle-in-a-haystack prompt, split where compression happens.

    ``context_ids [1, P]``: everything up to the end of the haystack (chat header, haystack with the needle);
    ``question_ids [1, Q]``: the question, the end of the user turn, the assistant header and the start of the
    answer (fed after the context was compressed: the compression does not see the question).
    ``needle_start``, ``needle_tokens``: where the needle starts in ``context_ids`` and its token count;
    ``haystack_span``: (first, end) token indices of the haystack (needle included) in ``context_ids``.
    """

    context_ids: Tensor
    question_ids: Tensor
    key: str
    answer: str
    depth: float
    needle_start: int
    needle_tokens: int
    haystack_span: tuple[int, int]

    @property
    def length(self) -> int:
        return self.context_ids.shape[1] + self.question_ids.shape[1]

    @property
    def needle_depth(self) -> float:
        """Fraction of the haystack's own tokens (the needle's excluded) that come before the needle."""
        first, end = self.haystack_span
        return (self.needle_start - first) / max(1, end - first - self.needle_tokens)


def _render(tokenizer, document: str, question: str, answer_prefix: str) -> tuple[str, str]:
    """(context text, question text) of the prompt; with the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        marker = "\x00QUESTION\x00"
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": document + marker}], tokenize=False,
                                                 add_generation_prompt=True)
        before, after = rendered.split(marker)
        return before, question + after + answer_prefix
    return document, question + "\nAnswer: " + answer_prefix


def make_needle_sample(tokenizer, lines: list[str], length: int, depth: float, rng: random.Random) -> NeedleSample:
    """A prompt of at most ``length`` tokens (close to it) with one needle at ``depth`` of the haystack.

    ``lines``: haystack verses (see :func:`corpus_region`); the haystack starts at a verse chosen by ``rng``,
    which also draws the city and the 6-digit code. The needle goes between the two verses whose boundary is
    nearest to ``depth`` × the haystack's tokens.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = rng.choice(CITIES)
    answer = str(rng.randint(100000, 999999))
    needle = f"The secret code of {key} is {answer}.\n"
    question = "\n" + QUESTION.format(key=key)
    answer_prefix = ANSWER_PREFIX.format(key=key)
    start = rng.randrange(len(lines))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    head, tail = _render(tokenizer, "", question, answer_prefix)
    overhead = len(tokenizer(head).input_ids) + count(tail) + count(needle)
    if overhead + 16 > length:
        raise ValueError(f"length={length} is too short for a needle prompt (needs more than {overhead + 16} tokens)")
    # Consecutive verses, each with its own token count, until the haystack has its share of the length (a
    # first verse longer than the whole share is skipped); the last one is trimmed again below if it overshoots.
    verses, sizes = [], []
    for i in range(start, start + len(lines)):
        if sum(sizes) >= length - overhead:
            break
        n = count(lines[i % len(lines)])
        if verses or n <= length - overhead:
            verses.append(lines[i % len(lines)])
            sizes.append(n)
    for _ in range(4):
        cumulative = [0]
        for s in sizes:
            cumulative.append(cumulative[-1] + s)
        cut = min(range(len(verses) + 1), key=lambda j: abs(cumulative[j] - depth * cumulative[-1]))
        document = "".join(verses[:cut]) + needle + "".join(verses[cut:])
        head, tail = _render(tokenizer, document, question, answer_prefix)
        context_ids = tokenizer(head, return_tensors="pt").input_ids
        question_ids = tokenizer(tail, add_special_tokens=False, return_tensors="pt").input_ids
        excess = context_ids.shape[1] + question_ids.shape[1] - length
        if excess <= 0:
            break
        while excess > 0 and len(verses) > 1:          # tokenising the whole text can differ from the sum: trim
            excess -= sizes.pop()
            verses.pop()
    else:
        raise RuntimeError(f"could not fit the needle prompt into {length} tokens")
    # Token index of the needle: tokenise the context text up to the needle.
    before_needle = head[:head.index(needle)]
    needle_start = len(tokenizer(before_needle).input_ids)
    first = len(tokenizer(head[:head.index(document)]).input_ids)
    end = len(tokenizer(head[:head.index(document) + len(document)]).input_ids)
    return NeedleSample(context_ids, question_ids, key, answer, depth, needle_start, count(needle), (first, end))


def answer_correct(generated: str, answer: str) -> bool:
    """True when the code ``answer`` appears in ``generated`` as a whole number (not inside a longer one)."""
    return re.search(rf"(?<!\d){re.escape(answer)}(?!\d)", generated) is not None
