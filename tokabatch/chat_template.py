"""Chat templates: OpenAI-style messages -> prompt text, rendered exactly as transformers renders them.

Same jinja environment as transformers (sandboxed, trim_blocks, lstrip_blocks, loopcontrols,
`{% generation %}` blocks, raise_exception, strftime_now, tojson without ASCII escaping) and the
same trick for continue_final_message. jinja2 and the stdlib only: must not import torch.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokabatch.errors import InvalidRequest

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "   # the marker transformers appends to the final message


class ChatTemplateError(InvalidRequest, ValueError):
    """Messages the template cannot render (bad parts, roles it rejects): an HTTP 400."""

    def __init__(self, message: str, *, param: str | None = "messages") -> None:
        super().__init__(message, param=param)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _content_text(content: Any, index: int) -> Any:
    """A message's content as a string: text parts are joined with newlines, like vLLM does."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatTemplateError(f"messages[{index}].content must be a string or a list of content parts")
    texts, other = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            other.append(str(kind))
    if other:
        raise ChatTemplateError(
            f"messages[{index}].content has unsupported part type(s): {', '.join(sorted(set(other)))}; "
            "this model takes text parts only")
    return "\n".join(texts)


def normalize_messages(messages: list[dict], template_source: str) -> list[dict]:
    """Fresh message dicts with string contents; `developer` becomes `system` unless the template knows it."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list")
    knows_developer = "developer" in template_source
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string 'role'")
        message = dict(message)
        if "content" in message:
            message["content"] = _content_text(message["content"], i)
        if message["role"] == "developer" and not knows_developer:
            message["role"] = "system"
        out.append(message)
    return out


class ChatTemplate:
    """One compiled template plus the special-token strings it sees (bos_token, eos_token, ...)."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        self.source = source
        self._special = dict(special_tokens)
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as e:
            self._template = None
            self._compile_error = str(e)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True,
               continue_final_message: bool = False, **kwargs: Any) -> str:
        if self._template is None:
            raise ChatTemplateError(f"the model's chat template does not compile: {self._compile_error}")
        if add_generation_prompt and continue_final_message:
            raise ChatTemplateError("add_generation_prompt and continue_final_message cannot both be set")
        messages = [dict(m) for m in messages]
        final = None
        if continue_final_message:
            final = messages[-1].get("content")
            if not isinstance(final, str):
                raise ChatTemplateError("continue_final_message needs a final message with text content")
            messages[-1]["content"] = final + _CONTINUE_TAG
        variables = {**self._special, "tools": None, "documents": None, **kwargs}
        try:
            text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template rejected the messages: {e}") from e
        if final is None:
            return text
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ChatTemplateError("continue_final_message: the chat template drops part of the final message")
        loc = text.rindex(tag)
        # A template that trims trailing spaces also trimmed them from the final message.
        return text[:loc] if text[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:loc].rstrip()


__all__ = ["ChatTemplate", "ChatTemplateError", "normalize_messages"]
