"""The exact value of a small arithmetic answer ("2^3", "\\frac{1}{2} + 1", "(1+2)*3"), safely.

Completions are untrusted text, so nothing here executes them: `eval` and sympy's
`parse_expr` (which evals) are out. `ast.parse` only builds a tree, and `_value` walks it
accepting numbers, + - * / **, unary signs and parentheses (which leave no node); a name,
call, attribute, subscript or anything else is refused. Values are `Fraction`s, so
equality is exact. Work is bounded: at most MAX_CHARS of input, integer exponents up to
MAX_EXPONENT, and no intermediate value above MAX_BITS (so "9**999**999" is refused,
not computed).
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

MAX_CHARS = 300
MAX_EXPONENT = 1000
MAX_BITS = 4096
_INNER_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)")
_DECIMAL = re.compile(r"(\d*)\.(\d+)")


def to_python_syntax(expression: str) -> str:
    """LaTeX-ish arithmetic to Python syntax: \\frac{a}{b} -> ((a)/(b)) (nested too), ^ -> **,
    \\cdot and \\times -> *, braces -> parentheses, thousands commas dropped, and each decimal
    literal written as an exact ratio (0.75 -> (75/100)) so no float ever appears."""
    text = expression.strip().strip("$").replace("\\left", "").replace("\\right", "")
    while _INNER_FRAC.search(text):  # innermost first, so \frac{\frac{1}{2}}{3} works
        text = _INNER_FRAC.sub(r"((\1)/(\2))", text)
    for latex, python in (("\\cdot", "*"), ("\\times", "*"), ("\u00d7", "*"), ("\u00f7", "/"), ("\\div", "/"),
                          ("^", "**"), ("{", "("), ("}", ")"), ("\u2212", "-")):
        text = text.replace(latex, python)
    text = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), text)
    return _DECIMAL.sub(lambda m: f"({int((m.group(1) or '0') + m.group(2))}/{10 ** len(m.group(2))})", text)


def safe_value(expression: str) -> Fraction | None:
    """The exact value of `expression`, or None when it is not bounded arithmetic on numbers."""
    if len(expression) > MAX_CHARS:
        return None
    try:
        tree = ast.parse(to_python_syntax(expression), mode="eval")
        return _value(tree.body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:  # bool and float are refused
        return _bounded(Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        operand = _value(node.operand)
        return operand if isinstance(node.op, ast.UAdd) else -operand
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)):
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        if isinstance(node.op, ast.Add):
            return _bounded(left + right)
        if isinstance(node.op, ast.Sub):
            return _bounded(left - right)
        if isinstance(node.op, ast.Mult):
            return _bounded(left * right)
        return _bounded(left / right)
    raise ValueError(f"not arithmetic: {type(node).__name__}")


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    # Checked before computing: the result's size is about bits(base) * exponent.
    if exponent.denominator != 1 or abs(exponent) > MAX_EXPONENT:
        raise ValueError("exponent is not a small integer")
    size = max(base.numerator.bit_length(), base.denominator.bit_length())
    if size * abs(exponent.numerator) > MAX_BITS:
        raise ValueError("power too large")
    return _bounded(base ** exponent.numerator)


def _bounded(value: Fraction) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_BITS:
        raise ValueError("value too large")
    return value
