"""The shared number validator: types, ranges, and the messages that name the argument."""
import math

import numpy as np
import pytest

from grades._checks import check_number


def test_accepts_and_converts():
    assert check_number(np.float32(0.5), "x", lo=0.0, hi=1.0, hi_open=True) == 0.5
    assert type(check_number(3, "x")) is float
    assert check_number(np.int64(4), "n", lo=1, integer=True) == 4
    assert check_number(None, "x", none=True) is None
    # an integer too large for a float is still an integer, in range or not
    assert check_number(10 ** 400, "n", lo=0, integer=True) == 10 ** 400


@pytest.mark.parametrize("v, kw, exc, msg", [
    (True, {}, TypeError, "x must be a real number, got bool"),
    (np.bool_(True), {}, TypeError, "x must be a real number"),
    ("1", {}, TypeError, "x must be a real number, got str"),
    (None, {}, TypeError, "x must be a real number, got NoneType"),
    (2.0, dict(integer=True), TypeError, "x must be an integer, got float"),
    (math.nan, {}, ValueError, "x must be a finite number, got nan"),
    (math.inf, dict(lo=0.0), ValueError, r"x must be a finite number >= 0, got inf"),
    (10 ** 400, dict(lo=0.0), ValueError, r"x must be a finite number >= 0"),  # no OverflowError
    (-(10 ** 400), dict(lo=0, integer=True), ValueError, r"x must be an integer >= 0"),
    (0.0, dict(lo=0.0, lo_open=True), ValueError, r"x must be a finite number > 0, got 0.0"),
    (1.0, dict(lo=0.0, hi=1.0, hi_open=True), ValueError, r"x must be a finite number in \[0, 1\), got 1.0"),
    (2, dict(hi=1, integer=True), ValueError, r"x must be an integer <= 1, got 2"),
])
def test_refuses_naming_the_argument(v, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        check_number(v, "x", **kw)
