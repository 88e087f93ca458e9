"""Numeric options that cannot work are refused where they are given, naming the option, its value and
the values it takes: a negative chunk size would otherwise train on nothing and report success, and a
zero batch size end in a bare ``ZeroDivisionError`` far from its cause."""

from __future__ import annotations

import operator

_BOUNDS = (("at_least", ">=", operator.ge), ("above", ">", operator.gt))
_TOPS = (("at_most", "<=", operator.le), ("below", "<", operator.lt))


def require(
    option: str,
    value: float | None,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> None:
    """Raise ``ValueError`` unless ``value`` lies within the bounds given (``None``: an unset option).

    ``require("data.val_fraction", -0.2, at_least=0, below=1)`` raises "data.val_fraction must be in
    [0, 1), got -0.2". NaN lies within no bounds.
    """
    if value is None:
        return
    given = {"at_least": at_least, "above": above, "at_most": at_most, "below": below}
    low = [(given[name], sign, check) for name, sign, check in _BOUNDS if given[name] is not None]
    high = [(given[name], sign, check) for name, sign, check in _TOPS if given[name] is not None]
    if all(check(value, bound) for bound, _, check in low + high):
        return
    if len(low) == 1 and len(high) == 1:
        (start, start_sign, _), (end, end_sign, _) = low[0], high[0]
        wanted = f"in {'[' if start_sign == '>=' else '('}{start}, {end}{']' if end_sign == '<=' else ')'}"
    else:
        wanted = " and ".join(f"{sign} {bound}" for bound, sign, _ in low + high)
    raise ValueError(f"{option} must be {wanted}, got {value!r}")
