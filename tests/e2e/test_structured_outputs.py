"""Structured outputs on the real engine (the demo model on the CPU) through `tokabatch serve`:

- a batch of 100 chat lines over 5 JSON schemas (nested objects, arrays, enums, bounded numbers,
  required fields): every line that ends with `stop` parses and validates with jsonschema, and at
  least 95 of the 100 end with `stop`; the same for guided_choice and guided_regex lines;
- the official openai client online: response_format json_schema, a forced tool call returned as
  message.tool_calls, and `chat.completions.parse` with a pydantic model.
"""

from __future__ import annotations

import io
import json
import re
import time

import jsonschema
import pydantic
import pytest

from tests.conftest import demo_model_ready
from tests.e2e.test_serve_real_engine import Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(not demo_model_ready(), reason="needs the demo model (`tokabatch models fetch`)")]

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 30}}, "required": ["name", "age", "city"],
        "additionalProperties": False},
    "label": {"type": "object", "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["sentiment", "confidence"], "additionalProperties": False},
    "book": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 40},
        "author": {"type": "object", "properties": {"first": {"type": "string", "maxLength": 20},
                                                    "last": {"type": "string", "maxLength": 20}},
                   "required": ["first", "last"], "additionalProperties": False},
        "year": {"type": "integer", "minimum": 1500, "maximum": 2030}},
        "required": ["title", "author", "year"], "additionalProperties": False},
    "list": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3}},
        "required": ["items"], "additionalProperties": False},
    "grade": {"type": "object", "properties": {
        "score": {"type": "integer", "minimum": 1, "maximum": 10}, "passed": {"type": "boolean"},
        "level": {"enum": ["low", "mid", "high"]}},
        "required": ["score", "passed", "level"], "additionalProperties": False},
}
QUESTIONS = {
    "person": "Invent a person and describe them.", "label": "Classify the sentiment of: 'I love this phone'.",
    "book": "Name a famous novel.", "list": "List some fruits.", "grade": "Grade this essay: 'The sky is blue.'",
}
CHOICES = ["yes", "no", "maybe"]
REGEX = r"[A-Z][a-z]{2,8} [0-9]{1,3}"


def _line(custom_id: str, user: str, **fields) -> str:
    body = {"model": "demo", "messages": [{"role": "user", "content": user}], "max_tokens": 120,
            "temperature": 0.7, "seed": int(custom_id.split("-")[-1]), **fields}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def test_structured_outputs_through_the_batch_api_and_online(tmp_path):
    server = Server(tmp_path / "data", tmp_path / "serve.log")
    try:
        client = server.client
        lines = []
        for name, schema in SCHEMAS.items():
            fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
            lines += [_line(f"{name}-{i}", QUESTIONS[name] + " Answer in JSON.", response_format=fmt)
                      for i in range(20)]
        lines += [_line(f"choice-{i}", "Is water wet?", guided_choice=CHOICES) for i in range(20)]
        lines += [_line(f"regex-{i}", "Name a city and a number.", guided_regex=REGEX) for i in range(20)]
        upload = client.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
        began = time.monotonic()
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired",
                                                                             "cancelled"):
            time.sleep(0.5)
        took = time.monotonic() - began
        assert batch.status == "completed" and batch.request_counts.failed == 0, batch
        results = {}
        for raw in client.files.content(batch.output_file_id).text.splitlines():
            line = json.loads(raw)
            choice = line["response"]["body"]["choices"][0]
            results[line["custom_id"]] = (choice["finish_reason"], choice["message"]["content"])

        stopped = 0
        for name, schema in SCHEMAS.items():
            for i in range(20):
                reason, text = results[f"{name}-{i}"]
                if reason == "stop":
                    stopped += 1
                    jsonschema.validate(json.loads(text), schema)        # parses and validates, every one
        assert stopped >= 95, f"{stopped} of 100 schema lines ended with stop"
        for i in range(20):
            reason, text = results[f"choice-{i}"]
            assert reason == "stop" and text in CHOICES
            reason, text = results[f"regex-{i}"]
            assert reason == "stop" and re.fullmatch(REGEX, text), text
        print(f"\n140 constrained lines in {took:.1f} s; {stopped}/100 schema lines ended with stop")

        # Online, with the official client.
        schema = SCHEMAS["label"]
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": QUESTIONS["label"]}], max_tokens=60, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "label", "schema": schema}})
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)

        weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}}
        clock = {"type": "function", "function": {"name": "get_time", "parameters": {
            "type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"],
            "additionalProperties": False}}}
        for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            reply = client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                tools=[weather, clock], tool_choice=tool_choice, max_tokens=80, temperature=0)
            choice = reply.choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            call = choice.message.tool_calls[0]
            assert call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
            arguments = json.loads(call.function.arguments)
            jsonschema.validate(arguments, (weather if call.function.name == "get_weather" else clock)
                                ["function"]["parameters"])
            if isinstance(tool_choice, dict):
                assert call.function.name == "get_weather"

        class Label(pydantic.BaseModel):
            sentiment: str
            confidence: float

        parsed = client.chat.completions.parse(model="demo", messages=[{"role": "user", "content": QUESTIONS["label"]}],
                                               response_format=Label, max_tokens=60, temperature=0)
        assert isinstance(parsed.choices[0].message.parsed, Label)
    finally:
        server.stop()
