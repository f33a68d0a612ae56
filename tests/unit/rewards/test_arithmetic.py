"""The safe arithmetic parser (soup/rewards/arithmetic.py): exact values, and refusal of anything else."""

from fractions import Fraction

import pytest

from soup.rewards.arithmetic import MAX_CHARS, safe_value, to_python_syntax


@pytest.mark.parametrize("expression, value", [
    ("2^3", 8), ("2**-2", Fraction(1, 4)), ("\\frac{1}{2}+1", Fraction(3, 2)), ("(1+2)*3", 9),
    ("-2**2", -4), ("2 \\times 3", 6), ("6 \\div 4", Fraction(3, 2)), ("0.1+0.2", Fraction(3, 10)),
    ("1.25*4", 5), ("1,000+1", 1001), ("\\frac{\\frac{1}{2}}{3}", Fraction(1, 6)), ("{2+3}^2", 25),
    ("$7$", 7), ("\\left(1+1\\right)", 2), ("10**300 - 10**300", 0),
])
def test_safe_value_is_exact(expression, value):
    assert safe_value(expression) == Fraction(value)


@pytest.mark.parametrize("expression", [
    "__import__('os').system('true')", "open('x')", "x + 1", "len('a')", "(1).real", "[1, 2]", "(1, 2)",
    "True + 1", "1j", "'a' * 3", "1 if 1 else 2", "lambda: 1", "2(3)", "1/0", "0**-1", "1e400",
])
def test_safe_value_refuses_anything_but_arithmetic(expression):
    assert safe_value(expression) is None


@pytest.mark.parametrize("expression", ["9**999**999", "2**1001", "(10**100)**100", "2**0.5", "1" * (MAX_CHARS + 1)])
def test_safe_value_refuses_unbounded_work(expression):
    assert safe_value(expression) is None


def test_decimals_become_exact_ratios_before_parsing():
    assert to_python_syntax("0.75 + \\frac{1}{4}") == "(75/100) + ((1)/(4))"
