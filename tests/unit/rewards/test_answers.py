"""Final-answer extraction and exact numeric comparison (soup/rewards/answers.py)."""

from fractions import Fraction

import pytest

from soup.rewards.answers import boxed_contents, extract_answer, reference_answer, safe_value, to_number


@pytest.mark.parametrize("text, answer", [
    ("so the total is \\boxed{1,234}.", "1,234"),
    ("\\boxed{\\frac{3}{4}} and later \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last box
    ("\\boxed{{a}+{b}}", "{a}+{b}"),  # nested braces
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("She has 5 apples and buys 7, so 12", "12"),
    ("it is 3/4 of the cake", "3/4"),
    ("no number here", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_an_unbalanced_box_is_no_answer():
    assert boxed_contents("\\boxed{12") is None and extract_answer("\\boxed{x") is None


@pytest.mark.parametrize("text, value", [
    ("1,234", Fraction(1234)), ("1234.0", Fraction(1234)), ("$5", Fraction(5)), ("-3", Fraction(-3)),
    ("3/4", Fraction(3, 4)), ("0.75", Fraction(3, 4)), ("50%", Fraction(1, 2)), ("\\frac{1}{3}", Fraction(1, 3)),
    ("2.50", Fraction(5, 2)), ("1e3", Fraction(1000)), ("72.", Fraction(72)), ("twelve", None), ("1/0", None),
])
def test_to_number_is_exact(text, value):
    assert to_number(text) == value


def test_gsm8k_reference_answers():
    assert reference_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
    assert reference_answer("72") == "72"


@pytest.mark.parametrize("expression, value", [
    ("2^3", Fraction(8)), ("\\frac{1}{2}+1", Fraction(3, 2)), ("(1+2)*3", Fraction(9)), ("-2**2", Fraction(-4)),
    ("2 \\times 3", Fraction(6)),
])
def test_safe_value_evaluates_arithmetic(expression, value):
    assert safe_value(expression) == value


@pytest.mark.parametrize("expression", ["__import__('os').system('true')", "x + 1", "2**100000", "len('a')",
                                        "1/0", "[1, 2]"])
def test_safe_value_refuses_everything_else(expression):
    assert safe_value(expression) is None
