import pytest

from soup.data.templates import CHATML, LLAMA3, MAX_TEMPLATE_CHARS, resolve_template
from soup.errors import ConfigError

RAW = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize("name, text", [("chatml", CHATML), ("llama3", LLAMA3)])
def test_presets_resolve_by_name(name, text):
    assert resolve_template(name, tokenizer_template=None) == text


def test_null_uses_the_tokenizers_own_template():
    assert resolve_template(None, tokenizer_template=RAW) == RAW


def test_null_without_a_tokenizer_template_is_an_error_naming_the_presets():
    with pytest.raises(ConfigError, match=r"(?s)data\.chat_template is null.*chatml, llama3"):
        resolve_template(None, tokenizer_template=None)


def test_raw_jinja_is_accepted():
    assert resolve_template(RAW, tokenizer_template=None) == RAW


@pytest.mark.parametrize("tag", [
    "{% include 'x.j2' %}",
    "{% import 'x.j2' as x %}",
    "{% extends 'base.j2' %}",
    "{%- from 'x.j2' import y %}",
    "{%+ include 'x.j2' %}",
])
def test_tags_that_read_other_files_are_forbidden(tag):
    with pytest.raises(ConfigError, match="could read other files"):
        resolve_template(RAW + tag, tokenizer_template=None)


def test_template_over_the_size_cap_is_refused():
    huge = "{{ 'x' }}" + " " * MAX_TEMPLATE_CHARS
    with pytest.raises(ConfigError, match=f"the cap is {MAX_TEMPLATE_CHARS}"):
        resolve_template(huge, tokenizer_template=None)


def test_jinja_syntax_error_is_reported_with_its_line():
    with pytest.raises(ConfigError, match=r"not valid Jinja \(line 1\)"):
        resolve_template("{% for m in messages %}{{ m }}", tokenizer_template=None)


def test_a_string_that_is_neither_preset_nor_jinja_is_refused():
    with pytest.raises(ConfigError, match="neither a preset nor a Jinja template"):
        resolve_template("chatml2", tokenizer_template=None)
