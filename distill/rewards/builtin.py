"""Built-in reward functions: answer accuracy, output format, DAPO's overlong penalty, token F1, and any
importable function. Each is a small class whose typed ``__init__`` is its YAML config (``class_path``)."""

from __future__ import annotations

import importlib
import re
import signal
import string
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from distill.ranges import require
from distill.rewards.scoring import reward_name, snake_case

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:/\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TEXT = re.compile(r"\\text(?:bf|rm)?\{([^{}]*)\}")
_MATHY = re.compile(r"[\d\\^_+\-*/=(){}\[\]]")
# without a timer (off the main thread) these can make sympy compute for hours: 10^{10^{10}}, 100000!
_RISKY = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\d+\s*\^|\^\s*\{?\s*\d{4,}|!|\*\*")
_MAX_MATH_CHARS = 256  # longer "answers" are prose: string comparison only
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def last_boxed(text: str) -> str | None:
    """The contents of the last balanced ``\\boxed{...}`` (nested braces allowed)."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def tagged_answer(text: str) -> str | None:
    """The last ``<answer>...</answer>``, else the last ``\\boxed{...}``, else None."""
    tags = _ANSWER_TAG.findall(text)
    return tags[-1].strip() if tags else last_boxed(text)


def extract_answer(text: str) -> str:
    """The tagged answer, else the last number, else the whole (stripped) text."""
    tagged = tagged_answer(text)
    if tagged is not None:
        return tagged
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else text.strip()


def normalise(text: str) -> str:
    """Lowercase, no ``$`` or ``\\text{}``, no thousands commas, single spaces, no punctuation at the ends."""
    text = _TEXT.sub(r"\1", text.lower().replace("$", ""))
    text = " ".join(_THOUSANDS.sub("", text).split())
    return text.strip(" .,;:?\"'")  # not brackets, signs or "!": they change the value


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: lowercase, no punctuation or articles, whitespace tokens, multiset overlap."""

    def tokens(text: str) -> list[str]:
        return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()

    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _column(fields: dict[str, Sequence], key: str, owner: str) -> Sequence:
    if key not in fields:
        raise ValueError(
            f"{owner} needs the field {key!r} in each prompt record; the records have {sorted(fields)}"
        )
    return fields[key]


def _references(value: object) -> list[str]:
    """A record's reference(s) as strings: a list means any of them counts."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [str(v).strip() for v in values if v is not None]


class _Expired(BaseException):
    """Raised by the timer; a BaseException so that math-verify's ``except Exception`` cannot swallow it."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[bool]:
    """A SIGALRM timer around the block, yielding whether one is set: signals only reach the main thread.

    Restores any timer already running (pytest-timeout's), which math-verify's own timeouts would cancel.
    """
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield False
        return

    def expire(signum: int, frame: object) -> None:
        raise _Expired

    handler = signal.signal(signal.SIGALRM, expire)
    outer, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, handler)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3), interval)


def _math(text: str) -> str:
    return text if "$" in text or "\\(" in text or "\\[" in text else f"${text}$"


def _math_equal(prediction: str, reference: str, timeout: float) -> bool:
    from math_verify import parse, verify  # sympy and antlr: seconds to import, only when needed

    try:
        with _time_limit(timeout) as timed:
            if not timed and (_RISKY.search(prediction) or _RISKY.search(reference)):
                return False
            # math-verify's own timeouts are signal.alarm in the caller's thread: off, ours wraps both
            gold = parse(_math(reference), parsing_timeout=None)
            target = parse(_math(prediction), parsing_timeout=None)
            return bool(gold and target and verify(gold, target, timeout_seconds=None))
    except _Expired:
        return False


def answers_match(prediction: str, reference: str, timeout: float = 2.0) -> bool:
    """Equal after ``normalise``, or mathematically equal by math-verify."""
    if normalise(prediction) == normalise(reference) and normalise(reference):
        return True
    if max(len(prediction), len(reference)) > _MAX_MATH_CHARS:
        return False
    # two words parse as products of symbols ("ab" == "ba"): only math-verify what looks like math
    if not (_MATHY.search(prediction) or _MATHY.search(reference)):
        return False
    return _math_equal(prediction, reference, timeout)


class Accuracy:
    """1.0 when the completion's answer equals the record's reference answer, else 0.0."""

    def __init__(
        self, answer_field: str = "answer", timeout: float = 2.0, weight: float = 1.0, name: str | None = None
    ) -> None:
        """
        Args:
            answer_field: The prompt record's key holding the reference (a list: any of them counts); a
                ``\\boxed{}`` in it (a full solution) is its answer.
            timeout: Seconds math-verify may take per completion (main thread only; elsewhere
                expressions that could run for long are compared as strings).
            weight: Weight of this reward in the total.
            name: Name in the logged metrics (default ``accuracy``).
        """
        self.answer_field = answer_field
        self.timeout = timeout
        self.weight = weight
        self.name = name or snake_case(type(self).__name__)

    def __call__(self, prompts: list[str], completions: list[str], **fields) -> list[float]:
        references = _column(fields, self.answer_field, type(self).__name__)
        out = []
        for completion, value in zip(completions, references, strict=True):
            prediction = extract_answer(completion)
            refs = [last_boxed(r) or r for r in _references(value)]
            out.append(float(any(answers_match(prediction, r, self.timeout) for r in refs)))
        return out


class Format:
    """1.0 when the whole (stripped) completion matches a regex, else 0.0."""

    def __init__(
        self,
        pattern: str = r"<think>.*?</think>\s*<answer>.*?</answer>",
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        """
        Args:
            pattern: Regex the completion must match in full (``.`` matches newlines).
            weight: Weight of this reward in the total.
            name: Name in the logged metrics (default ``format``).
        """
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except re.error as error:
            raise ValueError(f"Format pattern {pattern!r} is not a valid regex: {error}") from error
        self.pattern = pattern
        self.weight = weight
        self.name = name or snake_case(type(self).__name__)

    def __call__(self, prompts: list[str], completions: list[str], **fields) -> list[float]:
        return [float(self.regex.fullmatch(c.strip()) is not None) for c in completions]


class Length:
    """DAPO's soft overlong penalty: 0 up to ``max_tokens - buffer`` tokens, linear to -1 at ``max_tokens``,
    -1 beyond."""

    def __init__(
        self, max_tokens: int, buffer: int = 0, weight: float = 1.0, name: str | None = None
    ) -> None:
        """
        Args:
            max_tokens: Length (completion tokens) whose penalty is -1.
            buffer: Tokens before ``max_tokens`` over which the penalty ramps from 0 (0: a step).
            weight: Weight of this reward in the total.
            name: Name in the logged metrics (default ``length``).
        """
        require("Length max_tokens", max_tokens, at_least=1)
        if not 0 <= buffer <= max_tokens:
            raise ValueError(f"Length buffer must be in [0, max_tokens={max_tokens}], got {buffer}")
        self.max_tokens = max_tokens
        self.buffer = buffer
        self.weight = weight
        self.name = name or snake_case(type(self).__name__)

    def __call__(self, prompts: list[str], completions: list[str], **fields) -> list[float]:
        lengths = _column(fields, "completion_length", type(self).__name__)
        start = self.max_tokens - self.buffer
        return [
            0.0 if n <= start else -1.0 if n >= self.max_tokens else (start - n) / self.buffer
            for n in lengths
        ]


class TokenF1:
    """SQuAD token F1 between the completion's tagged answer (else the whole text) and the reference."""

    def __init__(self, answer_field: str = "answer", weight: float = 1.0, name: str | None = None) -> None:
        """
        Args:
            answer_field: The prompt record's key holding the reference (a list: the best F1 counts).
            weight: Weight of this reward in the total.
            name: Name in the logged metrics (default ``token_f1``).
        """
        self.answer_field = answer_field
        self.weight = weight
        self.name = name or snake_case(type(self).__name__)

    def __call__(self, prompts: list[str], completions: list[str], **fields) -> list[float]:
        references = _column(fields, self.answer_field, type(self).__name__)
        out = []
        for completion, value in zip(completions, references, strict=True):
            tagged = tagged_answer(completion)
            prediction = completion if tagged is None else tagged
            out.append(max((token_f1(prediction, r) for r in _references(value)), default=0.0))
        return out


def load_function(path: str) -> Callable:
    """The callable at ``package.module:function`` (or ``package.module.function``)."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"reward function {path!r}: give 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward function {path!r}: cannot import {module_name!r}: {error}") from error
    target: object = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"reward function {path!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"reward function {path!r} is a {type(target).__name__}, not a callable")
    return target


class Function:
    """Any importable ``fn(prompts, completions, **fields) -> list[float]`` (TRL's reward convention)."""

    def __init__(self, path: str, weight: float = 1.0, name: str | None = None) -> None:
        """
        Args:
            path: ``package.module:function`` (or ``package.module.function``); it must accept ``**kwargs``:
                the prompt record's fields, ``completion_length``, ``stopped`` and ``messages``.
            weight: Weight of this reward in the total.
            name: Name in the logged metrics (default: the function's name).
        """
        self.path = path
        self.fn = load_function(path)
        self.weight = weight
        self.name = name or reward_name(self.fn)

    def __call__(self, prompts: list[str], completions: list[str], **fields) -> list[float]:
        return self.fn(prompts, completions, **fields)
