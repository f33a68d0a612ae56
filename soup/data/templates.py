"""Chat templates: named presets, raw Jinja strings, and their validation.

`data.chat_template` is null (use the tokenizer's own), a preset name from
PRESETS, or a raw Jinja string. A raw string is checked before use: a size cap,
and no include/import/extends/from tags, since a template must not read files.
"""

from __future__ import annotations

import re

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from soup.errors import ConfigError

# ChatML, with tool calls rendered as JSON inside <tool_call> tags (the Hermes/Qwen
# convention) so tool-calling rows train on the exact call text.
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is defined and message['content'] is not none -%}{{- message['content'] -}}{%- endif -%}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{{- '\\n<tool_call>\\n' + (call['function'] if call['function'] is defined else call) | tojson + '\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['content'] is defined and message['content'] is not none -%}{{- message['content'] | trim -}}{%- endif -%}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{{- (call['function'] if call['function'] is defined else call) | tojson -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

PRESETS = {"chatml": CHATML, "llama3": LLAMA3}

MAX_TEMPLATE_CHARS = 32_768
_FORBIDDEN_TAG = re.compile(r"{%[-+]?\s*(include|import|extends|from)\b")


def validate_template(template: str, flag: str = "data.chat_template") -> str:
    """Return `template` if it is a safe, parseable Jinja chat template; else raise ConfigError."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ConfigError(
            f"{flag} is {len(template)} characters; the cap is {MAX_TEMPLATE_CHARS}.\n"
            f"  fix: shorten the template or use a preset ({', '.join(PRESETS)})."
        )
    match = _FORBIDDEN_TAG.search(template)
    if match:
        raise ConfigError(
            f"{flag} uses the '{match.group(1)}' tag, which could read other files.\n"
            "  fix: inline the template text; include/import/extends/from are not allowed."
        )
    try:
        ImmutableSandboxedEnvironment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"{flag} is not valid Jinja (line {exc.lineno}): {exc.message}") from exc
    return template


def resolve_template(value: str | None, tokenizer_template: str | None) -> str:
    """Turn the `data.chat_template` setting into Jinja text.

    value: None (the tokenizer's own), a preset name, or raw Jinja.
    """
    if value is None:
        if not tokenizer_template:
            raise ConfigError(
                "data.chat_template is null and the tokenizer has no chat template of its own.\n"
                f"  fix: set data.chat_template to a preset ({', '.join(PRESETS)}) or a Jinja string."
            )
        return tokenizer_template
    if value in PRESETS:
        return PRESETS[value]
    if "{{" in value or "{%" in value:
        return validate_template(value)
    raise ConfigError(
        f"data.chat_template={value!r} is neither a preset nor a Jinja template.\n"
        f"  fix: use one of {', '.join(PRESETS)}, null for the tokenizer's own, or a Jinja string."
    )
