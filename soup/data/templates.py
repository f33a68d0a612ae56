"""Chat templates: named presets, raw Jinja strings, and their validation.

`data.chat_template` is null (use the tokenizer's own), a preset name from
PRESETS, or a raw Jinja string. A template is code run on every row, so:

- a raw string is checked before use: a size cap, no include/import/extends/from
  tags (a template must not read files), and a probe render of a small conversation
  in a sandbox that also bounds `**` and sequence repetition, so a template that
  would exhaust memory is refused before any row;
- every render (bounded_render) runs in transformers' Jinja sandbox under a time
  limit and an output cap. A template the sandbox refuses (attribute escapes, huge
  ranges), a slow or huge render, each ends in a ConfigError that names the
  template and why, not the data row.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import threading
from datetime import datetime
from typing import Callable, Iterator

import jinja2
import jinja2.ext
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
# One conversation's render: far above any data.max_length, far below what hurts the machine.
RENDER_SECONDS = 5.0
MAX_RENDER_CHARS = 2_000_000
_PROBE = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello"}]
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
        compiled = _ProbeEnvironment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"{flag} is not valid Jinja (line {exc.lineno}): {exc.message}") from exc
    _probe(compiled, template, flag)
    return template


class _TemplateTimeout(Exception):
    pass


def template_refused(template: str, why: str, flag: str = "data.chat_template") -> ConfigError:
    excerpt = template if len(template) <= 80 else template[:77] + "..."
    return ConfigError(f"{flag} was refused: {why}.\n  template: {excerpt!r}\n"
                       f"  fix: use a preset ({', '.join(PRESETS)}), the tokenizer's own template (null), or a "
                       "template that reads only messages, tools and the special tokens.")


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _TemplateTimeout in the block after `seconds` (main thread only: SIGALRM)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(_signum, _frame):
        raise _TemplateTimeout

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def bounded_render(render: Callable[[], str], template: str, flag: str = "data.chat_template") -> str:
    """`render()` under the time limit and output cap; a refusal names the template, not the row.

    A template's own raise_exception (e.g. roles out of order) stays a jinja2.TemplateError:
    that one is about the row."""
    try:
        with _time_limit(RENDER_SECONDS):
            text = render()
    except jinja2.exceptions.SecurityError as exc:
        raise template_refused(template, f"Jinja's sandbox blocked it ({str(exc).rstrip('.')})", flag) from exc
    except OverflowError as exc:
        raise template_refused(template, f"Jinja's sandbox blocked it ({str(exc).rstrip('.')})", flag) from exc
    except _TemplateTimeout:
        raise template_refused(template, f"rendering one conversation took over {RENDER_SECONDS:g} s", flag) from None
    except MemoryError:
        raise template_refused(template, "rendering one conversation ran out of memory", flag) from None
    if len(text) > MAX_RENDER_CHARS:
        raise template_refused(template, f"it rendered one conversation as {len(text):,} characters (the cap is "
                                         f"{MAX_RENDER_CHARS:,})", flag)
    return text


class _ProbeEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat-template sandbox (its globals and tojson), with `**` and sequence
    repetition bounded too, for the probe render: those allocate before any time limit can act."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
            json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        self.globals.update(raise_exception=_raise_template_error, strftime_now=lambda f: datetime.now().strftime(f))

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and \
                right * math.log2(abs(left) + 1) > 4096:
            raise jinja2.exceptions.SecurityError(f"{left} ** {right} is larger than the sandbox allows")
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and isinstance(count, int) and \
                        len(sequence) * count > MAX_RENDER_CHARS:
                    raise jinja2.exceptions.SecurityError(f"repeating a sequence {count:,} times is more than the sandbox allows")
        return super().call_binop(context, operator, left, right)


def _raise_template_error(message):
    raise jinja2.TemplateError(message)


def _probe(compiled: jinja2.Template, template: str, flag: str) -> None:
    """Render a small conversation; refuse a template the sandbox blocks or that runs away.
    Its other errors (a role order it rejects, a variable it expects) are left to the real rows."""
    for add_generation_prompt in (False, True):
        try:
            bounded_render(lambda: compiled.render(messages=_PROBE, add_generation_prompt=add_generation_prompt,
                                                   bos_token="<s>", eos_token="</s>", tools=None), template, flag)
        except jinja2.TemplateError:
            return


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
