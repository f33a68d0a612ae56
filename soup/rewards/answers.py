"""Final answers: find the one a completion gives, and compare it with the row's, exactly, without eval.

    extract_answer("... so the total is \\boxed{1,234}.")  -> "1,234"
    extract_answer("Natalia sold 72 clips.\\n#### 72")      -> "72"
    parse_number("1,234") == parse_number("1234.0")          (Fraction(1234), not a percentage)
    same_answer("3/4", "0.75") and same_answer("50\\%", "50") and not same_answer("-5", "5")

Numbers are exact `fractions.Fraction`s, so 0.75 == 3/4 holds and 0.333 != 1/3. A percentage
matches its number both ways: GSM8K writes "what percent" answers as bare numbers ("50"),
others as a proportion ("0.5"). Units and labels around a number are dropped ("$18 per
hour", "x = 5", "10 \\text{ apples}"), which also means "10 million" reads as 10.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import NamedTuple

# One number as written in prose: an optional sign (not the hyphen of a range "3-5"), an
# optional $, digits with or without thousands commas, decimals, a fraction a/b, a percent.
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
NUMBER_IN_TEXT = re.compile(rf"(?:(?<![\w.)])-)?\$?(?:(?:{_DIGITS})\s*/\s*(?:{_DIGITS})|{_DIGITS})(?:\s*%)?")
_PLAIN = re.compile(rf"([+-]?)\$?({_DIGITS}|\d+(?:\.\d+)?[eE][+-]?\d+)")
_RATIO = re.compile(rf"([+-]?)\$?({_DIGITS})/({_DIGITS})")
_LATEX_FRAC = re.compile(rf"([+-]?)\\[dt]?frac\{{({_DIGITS})\}}\{{({_DIGITS})\}}")


class Number(NamedTuple):
    """A parsed number: its exact value as written ("50%" -> 50) and whether it was a percentage."""

    value: Fraction
    percent: bool


def boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (or \\fbox{...}), nested braces included; None if
    there is none or its braces never close (a truncated completion)."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    begin = text.index("{", start) + 1
    depth = 1
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """A completion's final answer: the last \\boxed{}, else the line after the last '####',
    else the last number in the text; None when it gives none, or when its last box never
    closes (a completion cut off mid-answer has not answered)."""
    found = boxed(text)
    if found is not None:
        return found
    if "\\boxed{" in text or "\\fbox{" in text:
        return None
    if "####" in text:
        return _after_marker(text) or None
    numbers = NUMBER_IN_TEXT.findall(text)
    return numbers[-1].strip() if numbers else None


def _after_marker(text: str) -> str:
    """The first line after the last '####' ('' when nothing follows it)."""
    tail = text.rsplit("####", 1)[1].strip()
    return tail.splitlines()[0].strip() if tail else ""


def reference_answer(text: str) -> str:
    """A data set's answer column: GSM8K's solution ends in '#### N', MATH's has a \\boxed{};
    a bare answer ("72") is itself."""
    if "####" in text:
        return _after_marker(text)
    found = boxed(text)
    return found if found is not None else text.strip()


def _undecorate(text: str) -> str:
    """Drop what surrounds a number: LaTeX text/spacing, $...$, 'x =', trailing unit words."""
    text = text.strip().replace("\u2212", "-").replace("\\!", "").replace("\\,", "").replace("{,}", ",")
    text = text.replace("\\%", "%").replace("\\$", "$").replace("\\left", "").replace("\\right", "")
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{[^{}]*\}", " ", text)  # LaTeX text is units or words
    text = re.sub(r"\^\{?\\circ\}?", "", text)
    text = text.strip().strip("$").strip()
    text = re.sub(r"^[A-Za-z]\w*\s*=\s*", "", text)  # "x = 5"
    text = re.sub(r"(?<=[\d%])\s*[A-Za-z][A-Za-z\s.]*$", "", text)  # "18 dollars per hour", "5 cm."
    return text.strip().rstrip(".").strip()


def parse_number(text: str | None) -> Number | None:
    """An exact number from an answer string, or None when the answer is not one number."""
    if text is None:
        return None
    cleaned = _undecorate(text)
    percent = cleaned.endswith("%")
    cleaned = cleaned.rstrip("%").strip()
    if cleaned.startswith("-$") or cleaned.startswith("+$"):
        cleaned = cleaned[0] + cleaned[2:]
    cleaned = re.sub(r"\s*/\s*", "/", cleaned)
    try:
        if match := _PLAIN.fullmatch(cleaned):
            value = Fraction(match.group(2).replace(",", ""))
        elif match := (_RATIO.fullmatch(cleaned) or _LATEX_FRAC.fullmatch(cleaned)):
            value = Fraction(match.group(2).replace(",", "")) / Fraction(match.group(3).replace(",", ""))
        else:
            return None
    except ZeroDivisionError:
        return None
    return Number(-value if match.group(1) == "-" else value, percent)


def same_number(a: Number, b: Number) -> bool:
    """Equal as rationals; a percentage p% also equals the plain number p and p/100."""
    if a.percent == b.percent:
        return a.value == b.value
    percentage, plain = (a, b) if a.percent else (b, a)
    return plain.value in (percentage.value, percentage.value / 100)


def normalised_text(text: str) -> str:
    """An answer that is not a number, compared as text: LaTeX text wrappers, $, spacing
    commands, whitespace, case and a final period dropped; \\dfrac and \\tfrac read as \\frac."""
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", text.strip().strip("$"))
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    for noise in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ "):
        text = text.replace(noise, "")
    return re.sub(r"\s+", "", text).lower().rstrip(".")


def same_answer(found: str | None, expected: str) -> bool:
    """Whether an extracted answer equals the reference: as numbers when the reference is one,
    else as normalised text."""
    if found is None:
        return False
    reference = parse_number(expected)
    if reference is not None:
        given = parse_number(found)
        return given is not None and same_number(given, reference)
    return normalised_text(found) == normalised_text(expected)
