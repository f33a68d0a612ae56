"""Final-answer extraction and exact comparison (soup/rewards/answers.py); expected values by hand."""

import json
from fractions import Fraction

import pytest

from soup.rewards.answers import Number, boxed, extract_answer, parse_number, reference_answer, same_answer
from tests.conftest import require_shared


@pytest.mark.parametrize("text, answer", [
    ("so the total is \\boxed{1,234}.", "1,234"),
    ("\\boxed{\\frac{3}{4}} at first, then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last box
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),  # nested braces
    ("\\fbox{9}", "9"),
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("#### 72 clips\nand some trailing text", "72 clips"),  # the line after the marker
    ("She has 5 apples and buys 7, so 12", "12"),  # else the last number
    ("it is 12, not 13,", "13"),  # a trailing comma is not part of the number
    ("He paid $1,200.50.", "$1,200.50"),
    ("Answer: -7", "-7"),
    ("read pages 3-5", "5"),  # the hyphen of a range is no minus sign
    ("48/2 = 24 clips", "24"),
    ("three quarters, 3/4", "3/4"),
    ("no number here", None),
    ("####", None),
    ("the answer is \\boxed{12", None),  # cut off inside the box: no answer, not the 12
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_boxed_needs_closing_braces():
    assert boxed("\\boxed{{1}") is None
    assert boxed("no box") is None


@pytest.mark.parametrize("text, value, percent", [
    ("1,234", 1234, False), ("1234.0", 1234, False), ("1,000,000", 1000000, False), ("$5", 5, False),
    ("-$5", -5, False), ("$-5", -5, False), ("\u22125", -5, False), ("+3", 3, False), ("-3", -3, False),
    ("3/4", Fraction(3, 4), False), ("3 / 4", Fraction(3, 4), False), ("0.75", Fraction(3, 4), False),
    (".5", Fraction(1, 2), False), ("2.50", Fraction(5, 2), False), ("\\frac{1}{3}", Fraction(1, 3), False),
    ("-\\dfrac{3}{4}", Fraction(-3, 4), False), ("1e3", 1000, False), ("72.", 72, False),
    ("50%", 50, True), ("12.5\\%", Fraction(25, 2), True),
    ("x = 5", 5, False), ("10 \\text{ apples}", 10, False), ("$18 per hour", 18, False), ("5 cm.", 5, False),
    ("90^\\circ", 90, False),
])
def test_parse_number_is_exact(text, value, percent):
    assert parse_number(text) == Number(Fraction(value), percent)


@pytest.mark.parametrize("text", ["twelve", "1/0", "12,34", "1 1/2", "5 and 7", "", "(1,2)", "\\sqrt{2}"])
def test_parse_number_refuses_what_is_not_one_number(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("found, expected, same", [
    ("1,234", "1234", True),
    ("3/4", "0.75", True),
    ("0.333", "1/3", False),  # exact, no tolerance
    ("-5", "5", False),
    ("5", "-5", False),
    ("50%", "50", True),  # GSM8K writes "what percent" answers as bare numbers
    ("50\\%", "0.5", True),  # ... others as a proportion
    ("50%", "5", False),
    ("25%", "25%", True),
    ("$1,200.50", "1200.5", True),
    ("\\text{Monday}", "monday", True),  # not numbers: normalised text
    ("\\dfrac{a}{b}", "\\frac{a}{b}", True),
    ("(1,2)", "(1, 2)", True),
    ("Tuesday", "monday", False),
    (None, "5", False),
    ("five", "5", False),
])
def test_same_answer(found, expected, same):
    assert same_answer(found, expected) is same


def test_reference_answers_from_solutions():
    assert reference_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
    assert reference_answer("So the area is $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"  # MATH-style
    assert reference_answer(" 72 ") == "72"


def test_real_gsm8k_rows_solution_and_answer_columns_agree():
    path = require_shared("data/math/gsm8k_train_first1000.jsonl")
    rows = [json.loads(line) for line in path.open()]
    for row in rows:  # the file's `answer` is the solution's '#### N' without thousands commas
        assert same_answer(reference_answer(row["solution"]), row["answer"]), row["solution"][-40:]
    assert reference_answer(rows[15]["solution"]) == "448000"  # row 15: '... $448,000\n#### 448000'
