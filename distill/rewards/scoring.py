"""Calling reward functions: their names and weights, and the (S, F) reward matrix with checked values."""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class RewardError(ValueError):
    """A reward function failed or returned something that is not one finite number per completion."""


def snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def reward_name(fn: Callable) -> str:
    """``fn.name`` if set, else a function's ``__name__``, else the snake_case name of the object's class."""
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(fn, functools.partial):
        return reward_name(fn.func)
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name:
        return "lambda" if name == "<lambda>" else name
    return snake_case(type(fn).__name__)


def names(functions: Sequence[Callable]) -> list[str]:
    """One name per function, unique: a repeated name gets a suffix (``format``, ``format_2``)."""
    out: list[str] = []
    for fn in functions:
        base = reward_name(fn)
        name, n = base, 1
        while name in out:
            n += 1
            name = f"{base}_{n}"
        out.append(name)
    return out


def weights(functions: Sequence[Callable]) -> Tensor:
    """(F,) float32: each function's ``weight`` (default 1.0)."""
    values = []
    for fn in functions:
        weight = getattr(fn, "weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RewardError(f"reward {reward_name(fn)!r} has weight {weight!r}; give a finite number")
        values.append(float(weight))
    return torch.tensor(values, dtype=torch.float32)


def _sample(sources: Sequence[str], i: int) -> str:
    return f"sample {i} ({sources[i]})" if i < len(sources) else f"sample {i}"


def _culprit(fn: Callable, prompts: list[str], completions: list[str], fields: dict[str, list]) -> int | None:
    """The first sample that makes ``fn`` raise on its own, to name it: the batch call cannot say which."""
    for i in range(len(completions)):
        try:
            fn(prompts[i : i + 1], completions[i : i + 1], **{k: v[i : i + 1] for k, v in fields.items()})
        except Exception:
            return i
    return None


def _value(result: object, name: str, i: int, sources: Sequence[str]) -> float:
    value = None
    if result is not None and not isinstance(result, (str, bytes)):
        with contextlib.suppress(TypeError, ValueError):
            value = float(result)  # also numpy scalars and 0-d tensors
    if value is None:
        raise RewardError(f"reward {name!r} returned {result!r} for {_sample(sources, i)}; expected a number")
    if not math.isfinite(value):
        raise RewardError(
            f"reward {name!r} returned {value} for {_sample(sources, i)}; rewards must be finite"
        )
    return value


def score(
    functions: Sequence[Callable],
    prompts: Sequence[str],
    completions: Sequence[str],
    fields: dict[str, Sequence],
    sources: Sequence[str],
) -> Tensor:
    """(S, F) float32: each function called once on all S completions, its unweighted reward per column;
    ``fields``: one list of S values per keyword argument; ``sources``: each prompt's record, for errors."""
    n = len(completions)
    columns = []
    for fn, name in zip(functions, names(functions), strict=True):
        # copies: a function that edits its inputs must not change what the next one sees
        args = (list(prompts), list(completions))
        kwargs = {key: list(values) for key, values in fields.items()}
        try:
            result = fn(*args, **kwargs)
        except Exception as error:
            found = _culprit(fn, *args, kwargs)
            where = f"the batch of {n} samples" if found is None else _sample(sources, found)
            raise RewardError(f"reward {name!r} raised on {where}: {error!r}") from error
        try:
            values = list(result)
        except TypeError as error:
            raise RewardError(
                f"reward {name!r} returned {type(result).__name__}, not a list of {n} numbers"
            ) from error
        if len(values) != n:
            raise RewardError(f"reward {name!r} returned {len(values)} values for {n} completions")
        columns.append([_value(v, name, i, sources) for i, v in enumerate(values)])
    if not columns:
        return torch.zeros(n, 0)
    return torch.tensor(columns, dtype=torch.float32).T.contiguous()
