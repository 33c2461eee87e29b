"""Typed reads of request-body fields with OpenAI's 400 errors (invalid_type, invalid_value, ...).

Shared by render.prepare_request for both endpoints; every failure is an InvalidRequest naming the
field in `param`. JSON booleans are never accepted as numbers (Python's bool is an int subclass).
Stdlib + tokabatch.errors only.
"""

from __future__ import annotations

from typing import Any, Mapping

from tokabatch.errors import InvalidRequest

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Bounds that keep one hostile line from costing the server or the engine more than a line should.
MAX_LOGIT_BIAS = 300                 # entries (OpenAI's limit)
MAX_STOP_CHARS = 1024                # per stop string: every generated token is matched against them
MAX_TOKEN_ID_LIST = 256              # stop_token_ids
MAX_MESSAGES = 2048                  # OpenAI's limit on a chat's messages


def invalid_value(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def invalid_type(param: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(f"Invalid type for '{param}': expected {expected}, but got {type(value).__name__} "
                          f"({value!r:.60}).", param=param, code="invalid_type")


def unsupported(param: str, what: str | None = None) -> InvalidRequest:
    return InvalidRequest(f"Unsupported parameter: '{param}' {what or 'is not supported by this server'}.",
                          param=param, code="unsupported_parameter")


def get_number(body: Mapping[str, Any], name: str, default: float | None, lo: float | None = None,
               hi: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid_type(name, "a number", value)
    if lo is not None and value < lo:
        raise invalid_value(name, f"Invalid '{name}': {value} is less than the minimum of {lo}.")
    if hi is not None and value > hi:
        raise invalid_value(name, f"Invalid '{name}': {value} is greater than the maximum of {hi}.")
    return float(value)


def get_int(body: Mapping[str, Any], name: str, default: int | None, lo: int | None = None,
            hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type(name, "an integer", value)
    if lo is not None and value < lo:
        raise invalid_value(name, f"Invalid '{name}': {value} is less than the minimum of {lo}.")
    if hi is not None and value > hi:
        raise invalid_value(name, f"Invalid '{name}': {value} is greater than the maximum of {hi}.")
    return value


def get_bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid_type(name, "a boolean", value)
    return value


def get_stop(body: Mapping[str, Any], max_stops: int = 4) -> tuple[str, ...]:
    """`stop`: a string, a list of at most `max_stops` strings, or null. Empty strings are dropped."""
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise invalid_type("stop", "a string or an array of strings", value)
    if len(value) > max_stops:
        raise invalid_value("stop", f"Invalid 'stop': at most {max_stops} stop sequences are allowed, "
                            f"got {len(value)}.")
    if any(len(s) > MAX_STOP_CHARS for s in value):
        raise invalid_value("stop", f"Invalid 'stop': a stop sequence may be at most {MAX_STOP_CHARS} characters.")
    return tuple(s for s in value if s)


def get_token_ids(body: Mapping[str, Any], name: str, vocab_size: int) -> tuple[int, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise invalid_type(name, "an array of integers", value)
    if len(value) > MAX_TOKEN_ID_LIST:
        raise invalid_value(name, f"Invalid '{name}': at most {MAX_TOKEN_ID_LIST} token ids, got {len(value)}.")
    for t in value:
        if not 0 <= t < vocab_size:
            raise invalid_value(name, f"Invalid '{name}': token id {t} is outside the vocabulary "
                                f"(0..{vocab_size - 1}).")
    return tuple(value)


def get_logit_bias(body: Mapping[str, Any], vocab_size: int) -> tuple[tuple[int, float], ...]:
    """`logit_bias`: {"<token id>": bias in [-100, 100]} -> sorted (id, bias) pairs."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise invalid_type("logit_bias", "an object", value)
    if len(value) > MAX_LOGIT_BIAS:
        raise invalid_value("logit_bias", f"Invalid 'logit_bias': at most {MAX_LOGIT_BIAS} entries, got {len(value)}.")
    pairs: list[tuple[int, float]] = []
    for key, bias in value.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise invalid_value("logit_bias", f"Invalid 'logit_bias': key {key!r} is not a token id.") from None
        if not 0 <= token_id < vocab_size:
            raise invalid_value("logit_bias", f"Invalid 'logit_bias': token id {token_id} is outside the "
                                f"vocabulary (0..{vocab_size - 1}).")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise invalid_type(f"logit_bias.{key}", "a number", bias)
        if not -100 <= bias <= 100:
            raise invalid_value("logit_bias", f"Invalid 'logit_bias': bias {bias} for token {token_id} must be "
                                "between -100 and 100.")
        pairs.append((token_id, float(bias)))
    return tuple(sorted(pairs))




def unprocessable(body: Any, exc: BaseException) -> InvalidRequest:
    """The 400 for a body that made the tokenizer or the template raise `exc`."""
    surrogate = _lone_surrogate(body)
    if surrogate is not None:
        param = "messages" if isinstance(body, Mapping) and "messages" in body else "prompt"
        return invalid_value(param, f"The request contains a lone surrogate ({surrogate!a}), which is not valid "
                                    "Unicode: every string must be valid UTF-8 text.")
    return InvalidRequest(f"The request could not be processed: {type(exc).__name__}: {exc}", code="invalid_value")


def _lone_surrogate(value: Any, depth: int = 0) -> str | None:
    """The first lone UTF-16 surrogate in the strings of `value` (JSON escapes like \\ud800 make them)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return value[err.start:err.end]
        return None
    if depth > 64:
        return None
    items = value.items() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        for part in (item if isinstance(value, Mapping) else (item,)):
            found = _lone_surrogate(part, depth + 1)
            if found is not None:
                return found
    return None


__all__ = [
    "INT64_MAX", "INT64_MIN", "get_bool", "get_int", "get_logit_bias", "get_number", "get_stop",
    "get_token_ids", "invalid_type", "invalid_value", "unprocessable", "unsupported",
]
