"""Checks of number-valued arguments, shared by the whole package.

One validator for plain numbers (:func:`check_number`) and its predicates; a bool is never a
number here (``True`` as a learning rate is a bug, not ``1.0``), NumPy scalars are.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch

__all__ = ["is_real", "is_integer", "check_number", "check_coefficient"]


def is_real(v: object) -> bool:
    """Whether ``v`` is a real number (Python or NumPy), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_integer(v: object) -> bool:
    """Whether ``v`` is an integer (Python or NumPy), not a bool."""
    return isinstance(v, numbers.Integral) and is_real(v)


def check_number(v: Any, name: str, *, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
                 hi_open: bool = False, integer: bool = False, none: bool = False) -> Optional[float]:
    """``v`` as a finite ``float`` (``int`` when ``integer``) within ``lo``..``hi`` (bounds
    included unless ``*_open``); ``None`` passes when ``none``.

    Raises:
        TypeError: ``v`` is not a real number (an integer when ``integer``).
        ValueError: ``v`` is not finite or lies outside the range.
    """
    if v is None and none:
        return None
    if not (is_integer(v) if integer else is_real(v)):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a real number'}, got {type(v).__name__}")
    x = int(v) if integer else _float(v)
    below = x <= lo if lo_open else x < lo
    above = x >= hi if hi_open else x > hi
    if not (integer or math.isfinite(x)) or below or above:  # an int is finite (and may not fit a float)
        what = "an integer" if integer else "a finite number"
        rng = _range(lo, hi, lo_open, hi_open)
        raise ValueError(f"{name} must be {what}{' ' + rng if rng else ''}, got {v!r}")
    return x


def _float(v: Any) -> float:
    """``float(v)``, ``inf`` for an integer too large for a float (a count of 10**400 is out of range)."""
    try:
        return float(v)
    except OverflowError:
        return math.inf


def _range(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    if math.isfinite(lo) and math.isfinite(hi):
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if math.isfinite(lo):
        return f"{'>' if lo_open else '>='} {lo:g}"
    if math.isfinite(hi):
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def check_coefficient(v: Any, name: str) -> None:
    """``v`` must be a real number or a one-element real tensor (any value: a non-finite one is
    a fact to record, not an error). Metadata only, no host sync.

    Raises:
        TypeError: neither a real number nor a real tensor.
        ValueError: a tensor with more than one element.
    """
    if isinstance(v, torch.Tensor):
        if v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{name} must be a real number or a one-element real tensor, got a {v.dtype} tensor")
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of shape "
                             f"{tuple(v.shape)}")
        return
    if not is_real(v):
        raise TypeError(f"{name} must be a real number or a one-element tensor, got {type(v).__name__} {v!r:.40}")
