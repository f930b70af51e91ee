"""Valid ranges of numeric config fields, declared in the field's type, and the one checker that reads them.

A field declares its range next to its default: `alpha: Annotated[float, Gt(0)] = 16.0`, with annotated_types'
`Gt`, `Ge`, `Lt`, `Le`, `Interval`, or `Rule` for a range they cannot say (e.g. "-1 or >= 1"). For an optional field
the range applies to values other than None: `Annotated[int | None, Ge(1)]`. Every float must also be finite, so YAML's
`.inf` and `.nan` are refused for every float key whatever its range. The run config (train/config.py) and the
library's configs (LoraConfig, GenerationConfig, MeshConfig) all check through `range_violation`, so a bad value gets
the same words whether it came from YAML or from Python."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any, Callable

from annotated_types import Ge, Gt, Interval, Le, Lt

__all__ = ["Ge", "Gt", "Interval", "Le", "Lt", "Rule", "check_fields", "range_violation", "split_annotated"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """A range annotated_types cannot express: `text` completes "must be ...", `test(value)` says if it holds."""

    text: str
    test: Callable[[Any], bool]


def split_annotated(hint: Any) -> tuple[Any, tuple]:
    """Annotated[float, Gt(0)] -> (float, (Gt(0),)); a plain hint -> (hint, ())."""
    if typing.get_origin(hint) is typing.Annotated:
        return hint.__origin__, tuple(hint.__metadata__)
    return hint, ()


def _bound(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _describe(c: Any) -> str:
    """Gt(0) -> '> 0'; Interval(ge=0, lt=1) -> 'in [0, 1)'; Rule -> its text."""
    if isinstance(c, Rule):
        return c.text
    low = (c.gt, "(") if getattr(c, "gt", None) is not None else (getattr(c, "ge", None), "[")
    high = (c.lt, ")") if getattr(c, "lt", None) is not None else (getattr(c, "le", None), "]")
    if isinstance(c, Interval) and low[0] is not None and high[0] is not None:
        return f"in {low[1]}{_bound(low[0])}, {_bound(high[0])}{high[1]}"
    parts = [f"{op} {_bound(getattr(c, name))}" for name, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
             if getattr(c, name, None) is not None]
    return " and ".join(parts)


def _holds(value: Any, c: Any) -> bool:
    if isinstance(c, Rule):
        return bool(c.test(value))
    checks = (("gt", lambda b: value > b), ("ge", lambda b: value >= b), ("lt", lambda b: value < b),
              ("le", lambda b: value <= b))
    return all(test(getattr(c, name)) for name, test in checks if getattr(c, name, None) is not None)


def _numeric_kind(hint: Any) -> type | None:
    """int or float when `hint` (Annotated removed) is a number or an optional number, else None."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [a for a in args if a is not type(None)]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (int, float) else None


def _type_problem(value: Any, kind: type | None) -> str | None:
    if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        return f"must be an integer, got {value!r} ({type(value).__name__})"
    if kind is float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        return f"must be a number, got {value!r} ({type(value).__name__})"
    return None


def range_violation(value: Any, hint: Any, *, check_type: bool = False) -> str | None:
    """What is wrong with `value` for a field typed `hint` ('must be > 0, got 0.0'), or None when it is in range.

    None passes (whether None is allowed is the type's business); check_type also requires an int for an int field
    and a real number for a float field (the run config checks types itself, with its own words)."""
    if value is None:
        return None
    base, constraints = split_annotated(hint)
    kind = _numeric_kind(base)
    if check_type and (problem := _type_problem(value, kind)):
        return problem
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return None  # ranges are about numbers; a non-number was refused (or allowed) by the type check
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    for c in constraints:
        if not _holds(value, c):
            return f"must be {_describe(c)}, got {value}"
    return None


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def check_fields(instance: Any, owner: str) -> None:
    """Raises ValueError('{owner}.{field} must be ..., got ...') for the first numeric field of dataclass `instance`
    that is not a number of its type or is outside its declared range."""
    hints = _hints(type(instance))
    for f in dataclasses.fields(instance):
        problem = range_violation(getattr(instance, f.name), hints[f.name], check_type=True)
        if problem:
            raise ValueError(f"{owner}.{f.name} {problem}")
