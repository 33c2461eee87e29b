"""Structured outputs: a request's response_format, forced tool call or guided_* field -> a grammar.

Owns which body fields constrain the output and how (contract: docs/structured-outputs.md):

  - chat `response_format`: {"type": "text"} (nothing), {"type": "json_object"} (any JSON object),
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} (JSON valid for the schema);
  - chat `tools` with `tool_choice` "required" (one call of any of the tools: the output is
    {"name": ..., "arguments": {...}}, rendered as message.tool_calls) or {"type": "function",
    "function": {"name": ...}} (the output is that function's arguments); "none" leaves the output
    free (the tools still reach the chat template); "auto", or tools without tool_choice, is a 400:
    deciding whether to call a tool would need a model-specific parser of free text;
  - on both endpoints, vLLM's extensions: `guided_json` (a schema), `guided_regex`, `guided_choice`
    (a list of strings), `guided_grammar` (EBNF/GBNF or Lark).

The grammar is llguidance's text (engine/runtime/grammar.py applies it token by token); building
and checking it is cached by the field's JSON text, so a 50,000-line file with one schema compiles
once. A field that cannot become a grammar is the line's 400 (`invalid_value`, with llguidance's
message), found while the line is prepared, never in the engine. llguidance needs no torch.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Mapping

from tokabatch.service.jobs import body_fields as bf

GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
MAX_GRAMMAR_CACHE = 512
MAX_FORMAT_CHARS = 64 * 1024        # a schema, regex, choice list or grammar (compiling is per distinct text)
# JSON may be laid out as the model likes (models pretty-print), but each run of whitespace is
# bounded: unbounded runs let a sampled model pad forever and never close the object. A schema's
# own "x-guidance" options win over these.
JSON_OPTIONS = {"whitespace_pattern": r"[ \t\n\r]{0,40}"}


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """What a request asks of its output's form. `grammar`: llguidance grammar text, or None.
    `tool`: how the output becomes message.tool_calls — None (the output is content), "" (any tool:
    the output names it), or the one function's name (the output is its arguments)."""

    grammar: str | None = None
    tool: str | None = None
    tools: tuple[dict, ...] = ()          # for the chat template


NO_FORMAT = OutputFormat()


def output_format(body: Mapping[str, Any], *, chat: bool) -> OutputFormat:
    """The request's output format; InvalidRequest for a field that is wrong or cannot be compiled."""
    tools = _tools(body) if chat else ()
    sources = [name for name in GUIDED_FIELDS if body.get(name) is not None]
    if chat and _constraining_response_format(body):
        sources.append("response_format")
    tool_choice = body.get("tool_choice") if chat else None
    if tools and tool_choice != "none":
        sources.append("tool_choice")
    if len(sources) > 1:
        raise bf.invalid_value(sources[1], f"Invalid '{sources[1]}': only one of {', '.join(sources)} may "
                               "constrain the output of one request.")
    if not sources:
        return OutputFormat(tools=tools)
    source = sources[0]
    if source == "tool_choice":
        return _tool_format(tools, tool_choice)
    if source == "response_format":
        return OutputFormat(grammar=_response_format_grammar(body["response_format"]), tools=tools)
    return OutputFormat(grammar=_guided_grammar(source, body[source]), tools=tools)


def _constraining_response_format(body: Mapping[str, Any]) -> bool:
    value = body.get("response_format")
    if value is None:
        return False
    if not isinstance(value, dict):
        raise bf.invalid_type("response_format", "an object", value)
    return value.get("type") != "text"


def _response_format_grammar(value: dict) -> str:
    kind = value.get("type")
    if kind == "json_object":
        return _schema_grammar(json.dumps({"type": "object"}), "response_format")
    if kind != "json_schema":
        raise bf.invalid_value("response_format.type", f"Invalid 'response_format.type': {kind!r}; expected "
                               "'text', 'json_object' or 'json_schema'.")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bf.invalid_type("response_format.json_schema", "an object", spec)
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise bf.invalid_value("response_format.json_schema.name",
                               "Missing required parameter: 'response_format.json_schema.name'.")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise bf.invalid_type("response_format.json_schema.schema", "an object", schema)
    return _schema_grammar(_canonical(schema), "response_format.json_schema.schema")


def _guided_grammar(name: str, value: Any) -> str:
    if name == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):        # RecursionError: nested too deeply
                raise bf.invalid_value(name, f"Invalid '{name}': not a JSON schema (not parseable JSON).") from None
        if not isinstance(value, dict):
            raise bf.invalid_type(name, "a JSON schema object", value)
        return _schema_grammar(_canonical(value), name)
    if name == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise bf.invalid_type(name, "a non-empty array of non-empty strings", value)
        return _compiled("choice", json.dumps(value), name)
    if not isinstance(value, str) or not value:
        raise bf.invalid_type(name, "a non-empty string", value)
    return _compiled("regex" if name == "guided_regex" else "grammar", value, name)


def _tools(body: Mapping[str, Any]) -> tuple[dict, ...]:
    tools = body.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list) or not tools:
        raise bf.invalid_type("tools", "a non-empty array of tools", tools)
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise bf.invalid_value(f"tools[{i}]", f"Invalid 'tools[{i}]': expected {{\"type\": \"function\", "
                                   "\"function\": {\"name\", \"parameters\"}}.")
        name = function.get("name")
        if not isinstance(name, str) or not name or name in names:
            raise bf.invalid_value(f"tools[{i}].function.name", f"Invalid 'tools[{i}].function.name': expected a "
                                   "non-empty name, different from the other tools'.")
        names.add(name)
        if not isinstance(function.get("parameters", {}), dict):
            raise bf.invalid_type(f"tools[{i}].function.parameters", "a JSON schema object", function["parameters"])
    return tuple(tools)


def _tool_format(tools: tuple[dict, ...], tool_choice: Any) -> OutputFormat:
    functions = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    if tool_choice == "required":
        schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
                             "required": ["name", "arguments"], "additionalProperties": False}
                            for name, parameters in functions.items()]}
        return OutputFormat(grammar=_schema_grammar(_canonical(schema), "tools"), tool="", tools=tools)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in functions:
            raise bf.invalid_value("tool_choice", f"Invalid 'tool_choice': no tool named {name!r} in 'tools'.")
        return OutputFormat(grammar=_schema_grammar(_canonical(functions[name]), "tools"), tool=name, tools=tools)
    if tool_choice is None or tool_choice == "auto":
        raise bf.unsupported("tool_choice", "'auto' (the default with tools) is not supported: set it to "
                             "'required', name a function, or 'none'")
    raise bf.invalid_value("tool_choice", f"Invalid 'tool_choice': {tool_choice!r}; expected 'none', 'required' "
                           "or {\"type\": \"function\", \"function\": {\"name\": ...}}.")


def _canonical(schema: dict) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def _schema_grammar(schema_json: str, param: str) -> str:
    return _compiled("json_schema", schema_json, param)


def _compiled(kind: str, text: str, param: str) -> str:
    if len(text) > MAX_FORMAT_CHARS:
        raise bf.invalid_value(param, f"Invalid '{param}': an output format may be at most {MAX_FORMAT_CHARS} "
                               f"characters of JSON or grammar text, got {len(text)}.")
    grammar, error = _compile(kind, text)
    if error:
        raise bf.invalid_value(param, f"Invalid '{param}': it cannot be used as an output format: {error}")
    return grammar


@functools.lru_cache(maxsize=MAX_GRAMMAR_CACHE)
def _compile(kind: str, text: str) -> tuple[str, str]:
    """(grammar, "") or ("", why not): llguidance's grammar text for `text` of `kind`, checked."""
    import llguidance

    try:
        if kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        else:
            grammar = llguidance.grammar_from(kind, text)
    except (ValueError, TypeError) as exc:
        return "", str(exc)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    return (grammar, "") if not error else ("", error)


def json_schema_grammar(schema: dict) -> str:
    """The grammar of JSON valid for `schema` (InvalidRequest when it cannot be one)."""
    return _schema_grammar(_canonical(schema), "schema")


def tool_calls(fmt: OutputFormat, text: str, call_id: str) -> list[dict] | None:
    """The output as message.tool_calls, or None when it is not one (cut by max_tokens: not JSON)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):        # RecursionError: a free-form argument nested too deeply
        return None
    if fmt.tool:
        name, arguments = fmt.tool, value
    elif isinstance(value, dict) and "name" in value:
        name, arguments = value["name"], value.get("arguments", {})
    else:
        return None
    return [{"id": call_id, "type": "function",
             "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}]


__all__ = ["GUIDED_FIELDS", "JSON_OPTIONS", "NO_FORMAT", "OutputFormat", "json_schema_grammar", "output_format",
           "tool_calls"]
