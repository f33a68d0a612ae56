"""Final answers: finding them in a completion and comparing them as numbers, without eval.

extract_answer finds the last `\\boxed{...}` (braces nested), else the text after the last
`####` (GSM8K), else the last number. to_number reads "1,234", "$5", "-3", "2.50", "3/4",
"12%" and "1.0e3" as an exact Fraction. safe_value evaluates a small arithmetic expression
(numbers, + - * / ^ **, parentheses) by walking Python's ast: nothing is executed, names
and calls are refused, and exponents are bounded.
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\d+/\d+|-?\$?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?%?|-?\$?\.\d+%?")
MAX_EXPONENT = 64


def boxed_contents(text: str) -> str | None:
    """The contents of the last \\boxed{...} (or \\fbox{...}), nested braces included."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
        i += 1
    return None  # unbalanced: no answer


def extract_answer(text: str) -> str | None:
    """The completion's final answer: \\boxed{}, else after the last ####, else the last number."""
    boxed = boxed_contents(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def reference_answer(text: str) -> str:
    """A data set's answer column: GSM8K's full solution ends in '#### N'; a bare answer is itself."""
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


def to_number(text: str | None) -> Fraction | None:
    """An exact number from an answer string, or None when it is not one."""
    if text is None:
        return None
    cleaned = text.strip().rstrip(".").replace(" ", "")
    cleaned = re.sub(r"^\\text\{(.*)\}$", r"\1", cleaned)
    cleaned = cleaned.replace("\\$", "").replace("$", "").replace("\\%", "%").replace("{,}", "")
    percent = cleaned.endswith("%")
    cleaned = cleaned.rstrip("%")
    frac = re.fullmatch(r"\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", cleaned)
    if frac:
        cleaned = f"{frac.group(1)}/{frac.group(2)}"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", cleaned):
        cleaned = cleaned.replace(",", "")
    try:
        if "/" in cleaned:
            num, den = cleaned.split("/", 1)
            value = Fraction(num) / Fraction(den)
        else:
            value = Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def safe_value(expression: str) -> Fraction | None:
    """The exact value of a small arithmetic expression, or None when it is anything else."""
    text = expression.replace("^", "**").replace("\\cdot", "*").replace("\\times", "*").replace(",", "")
    frac = re.sub(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", r"((\1)/(\2))", text)
    try:
        tree = ast.parse(frac.replace("{", "(").replace("}", ")"), mode="eval")
        return _evaluate(tree.body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if isinstance(node.op, ast.Div):
            return left / right
        if isinstance(node.op, ast.Pow):
            if right.denominator != 1 or abs(right) > MAX_EXPONENT:
                raise ValueError("exponent outside what the parser decides")
            return left ** int(right)
    raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")


def normalised_text(text: str) -> str:
    """For answers that are not numbers: case, spaces, surrounding $ and \\text{} dropped."""
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text.strip().strip("$"))
    return re.sub(r"\s+", "", text).lower().rstrip(".")
