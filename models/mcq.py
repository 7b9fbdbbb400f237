"""The defender's task contract: the MCQ prompt, answer extraction and the reward (METHOD.md).

Reward: 0.8 if the extracted letter equals the ground truth, plus 0.2 only if correct AND
written exactly as ``\\boxed{X}``. Extraction: strict ``\\boxed{LETTER}`` first, then a lenient
boxed variant (other brackets, any case). Several boxed answers that disagree count as no
answer: hedging is not rewarded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from world.questions import letters  # option letters A, B, ... by position: one definition

PROMPT_TEMPLATE = (
    "Please answer the following multiple-choice question. Choose the best answer from the options "
    "provided.\n\n{question}\n\nProvide your final answer in the format \\boxed{{X}}, where X is the "
    "letter of your choice."
)
ACCURACY_REWARD = 0.8
FORMAT_REWARD = 0.2

_STRICT = re.compile(r"\\boxed\{([A-Z])\}")
# Possessive quantifiers (``*+``): the lenient form allows white space on both sides of an optional
# parenthesis, and with backtracking quantifiers a degenerate rollout ("\\boxed{" + spaces + a letter
# + spaces + no bracket) costs n^3 steps (seconds at n = 800); the possessive form matches the same
# strings in linear time.
_LENIENT = re.compile(r"\\boxed\s*+[\{\(\[]\s*+(?:\(\s*+)?([A-Za-z])\s*+(?:\)\s*+)?[\}\)\]]")
_OPTION_LINE = re.compile(r"^\(([A-Z])\) (.*)$")
YES_NO_PROMPT = "Answer with \\boxed{Yes} or \\boxed{No}."
_BOXED_YES_NO = re.compile(r"\\boxed\s*+[\{\(\[]\s*+(yes|no)\s*+[\}\)\]]", re.IGNORECASE)
YES_NO_WORD = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def extract_yes_no(text: str, words: bool = False) -> str | None:
    """The answer "yes" or "no" from ``\\boxed{Yes}``-style answers (any bracket, any case); with ``words``,
    from plain yes/no words when nothing is boxed. None if absent or contradictory."""
    found = {m.lower() for m in _BOXED_YES_NO.findall(text)}
    if not found and words:
        found = {m.lower() for m in YES_NO_WORD.findall(text)}
    return found.pop() if len(found) == 1 else None


def question_block(question: str, options: list[str]) -> str:
    lines = [question] + [f"({letter}) {text}" for letter, text in zip(letters(len(options)), options)]
    return "\n".join(lines)


def format_prompt(question: str, options: list[str]) -> str:
    return PROMPT_TEMPLATE.format(question=question_block(question, options))


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """Inverse of ``format_prompt``: (question, options). For scripted baselines."""
    head, _, rest = prompt.partition("\n\n")
    block, _, _ = rest.partition("\n\nProvide your final answer")
    lines = block.split("\n")
    options = []
    for line in lines[1:]:
        m = _OPTION_LINE.match(line)
        if m:
            options.append(m.group(2))
    return lines[0], options


@dataclass(frozen=True)
class Extraction:
    letter: str | None
    strict: bool  # exactly one \boxed{X} with an upper-case letter and nothing else boxed


def extract_choice(text: str, num_options: int | None = None) -> Extraction:
    valid = set(letters(num_options)) if num_options else None
    strict = _STRICT.findall(text)
    lenient = [m.upper() for m in _LENIENT.findall(text)]
    found = strict if strict else lenient
    if not found or len(set(found)) != 1:
        return Extraction(None, False)
    letter = found[0].upper()
    if valid is not None and letter not in valid:
        return Extraction(None, False)
    is_strict = len(strict) == 1 and len(lenient) == 1 and strict[0] == letter
    return Extraction(letter, is_strict)


def mcq_reward(text: str, answer: str, num_options: int | None = None) -> float:
    ext = extract_choice(text, num_options)
    if ext.letter is None or ext.letter != answer:
        return 0.0
    return ACCURACY_REWARD + (FORMAT_REWARD if ext.strict else 0.0)
