"""A chat template is code run on every row: one the sandbox blocks, one that runs away
in time or size, is refused naming the template and why, never blaming the data row
(issue 10, item 2)."""

import time

import jinja2
import pytest

from soup.data import templates
from soup.data.templates import PRESETS, validate_template
from soup.data.tokenize import render_chat
from soup.errors import ConfigError
from soup.models.tokenizer import build_byte_tokenizer

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
ESCAPES = {
    "class": ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__' of 'str' object is unsafe"),
    "globals": ("{{ cycler.__init__.__globals__ }}", "access to attribute '__init__'"),
    "range": ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
    "repeat": ("{{ 'x' * 10**10 }}", "repeating a sequence"),
    "power": ("{% set n = 10 %}{{ n ** 100000 }}", "is larger than the sandbox allows"),
}


@pytest.mark.parametrize("name", ESCAPES)
def test_a_template_the_sandbox_blocks_is_refused_at_load_naming_it(name):
    template, why = ESCAPES[name]
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        validate_template(template)
    message = str(err.value)
    assert message.startswith("data.chat_template was refused: Jinja's sandbox blocked it")
    assert why in message and repr(template) in message and "fix:" in message
    assert "row" not in message
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize("name", ["class", "globals", "range"])
def test_a_render_the_sandbox_blocks_is_a_template_error_not_a_row_error(name):
    """The tokenizer's own template, or one reaching a row that the probe did not: same message."""
    template, why = ESCAPES[name]
    with pytest.raises(ConfigError, match="data.chat_template was refused") as err:
        render_chat(MESSAGES, build_byte_tokenizer(), template)
    assert why in str(err.value)


def test_a_render_that_runs_too_long_is_stopped(monkeypatch):
    monkeypatch.setattr(templates, "RENDER_SECONDS", 0.3)
    loops = "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}"
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="took over 0.3 s"):
        render_chat(MESSAGES, build_byte_tokenizer(), loops)
    assert time.perf_counter() - started < 3


def test_a_render_beyond_the_output_cap_is_refused(monkeypatch):
    monkeypatch.setattr(templates, "MAX_RENDER_CHARS", 1000)
    with pytest.raises(ConfigError, match="rendered one conversation as 5,000 characters"):
        render_chat(MESSAGES, build_byte_tokenizer(), "{% for i in range(5000) %}x{% endfor %}")


def test_a_template_that_refuses_a_conversation_is_still_about_the_row():
    """raise_exception (e.g. roles out of order) is the data's problem: it stays a TemplateError."""
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ raise_exception('roles must alternate') }}"
    assert validate_template(template) == template  # the probe leaves it to the real rows
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        render_chat(MESSAGES, build_byte_tokenizer(), template)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_pass_the_probe_and_render_as_before(name):
    assert validate_template(PRESETS[name]) == PRESETS[name]
    tokenizer = build_byte_tokenizer()
    expected = tokenizer.apply_chat_template(MESSAGES, chat_template=PRESETS[name], tokenize=False)
    assert render_chat(MESSAGES, tokenizer, PRESETS[name]) == expected
