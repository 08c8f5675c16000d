"""The shared argument checks: messages name the argument and echo the value."""

from __future__ import annotations

import math

import pytest

from lightning_phases._validation import check_bool, check_choice, check_int, check_real, check_seed
from lightning_phases.errors import LightningPhasesError


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: check_int("probe_size", 1, minimum=2), r"probe_size must be an int >= 2; got 1\."),
        (lambda: check_int("n", True, minimum=0), r"n must be an int >= 0; got True\."),
        (lambda: check_int("n", 2.0), r"n must be an int; got 2\.0\."),
        (lambda: check_int("k", 11, minimum=1, maximum=10), r"k must be an int >= 1 and <= 10; got 11\."),
        (lambda: check_real("f", math.nan), r"f must be a finite number; got nan\."),
        (
            lambda: check_real("f", 0.0, minimum=0, maximum=1, open_minimum=True),
            r"f must be a finite number in \(0, 1\]; got 0\.0\.",
        ),
        (lambda: check_real("f", "1"), r"f must be a finite number; got '1'\."),
        (lambda: check_bool("stop", "no"), r"stop must be True or False; got 'no'\."),
        (lambda: check_bool("stop", 1), r"stop must be True or False; got 1\."),
        (lambda: check_seed("seed", -3), r"seed must be a non-negative int; got -3\."),
        (lambda: check_seed("seed", 1.5), r"seed must be a non-negative int; got 1\.5\."),
        (
            lambda: check_choice("task", "cls", ("auto", "binary")),
            r"task must be one of \('auto', 'binary'\); got 'cls'\.",
        ),
    ],
)
def test_refusals_name_the_argument_and_echo_the_value(call, match):
    with pytest.raises(LightningPhasesError, match=match):
        call()


def test_accepted_values():
    check_int("n", None, allow_none=True)
    check_int("n", 5, minimum=1, maximum=5)
    check_real("f", 1, minimum=0, maximum=1)
    check_real("f", None, allow_none=True)
    check_bool("flag", False)
    check_seed("seed", 2**70)  # any non-negative int
    check_choice("task", "auto", ("auto",))
