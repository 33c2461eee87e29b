"""render: request bodies -> engine requests (every 400, OpenAI's defaults) and outputs -> response
bodies that pass the openai types' strict model_validate."""

from __future__ import annotations

import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from tests.service.jobsutil import model_info_for, tiny_tokenizer
from tokabatch.engine.api import (
    ChoiceOutput, FinishReason, GenerationOutput, Priority, RequestError, TokenLogprob,
)
from tokabatch.errors import InvalidRequest, NotFound
from tokabatch.service.jobs.render import (
    CHAT_ENDPOINT, COMPLETIONS_ENDPOINT, error_body, first_failure, prepare_request, render_response,
)

CTX = 256
MODELS = {"tiny", "demo"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def prep(tok, endpoint, body, **kw):
    return prepare_request(endpoint, body, tokenizer=tok, model_info=model_info_for(tok, context_length=CTX),
                           served_model_names=MODELS, request_id="req_abc123", **kw)


def chat_body(**changes):
    return {"model": "tiny", "messages": [{"role": "user", "content": "What is the capital of France?"}], **changes}


def fake_output(tok, request, *, text="Paris is the capital.", finish=FinishReason.STOP, cached=3,
                logprobs=False, prompt_logprobs=False):
    """What an engine would return for `request`: each choice generates the ids of `text`."""
    ids = tuple(tok.encode(text))
    k = request.sampling.logprobs
    choices = []
    for i in range(request.n):
        lps = None
        if logprobs:
            lps = tuple(TokenLogprob(t, -0.5, tuple((t2, -0.5 - j) for j, t2 in enumerate([t, 5, 6, 7][:k])))
                        for t in ids)
        choices.append(ChoiceOutput(i, ids, text, finish, lps))
    plp = None
    if prompt_logprobs:
        plp = (None,) + tuple(TokenLogprob(t, -1.25, ((t, -1.25),)) for t in request.prompt_token_ids[1:])
    return GenerationOutput(request.request_id, tuple(choices), len(request.prompt_token_ids), cached,
                            len(ids) * request.n, prompt_logprobs=plp)


def render(tok, prepared, **kw):
    outs = [fake_output(tok, r, **kw) for r in prepared.requests]
    body = render_response(prepared, outs, created=1_700_000_000)
    json.dumps(body, allow_nan=False)           # must be plain JSON (no NaN/Infinity)
    return body


# ---- chat -------------------------------------------------------------------------------------------

def test_chat_defaults_and_strict_body(tok):
    p = prep(tok, CHAT_ENDPOINT, chat_body())
    (req,) = p.requests
    prompt_ids = tok.apply_chat_template(chat_body()["messages"])
    assert list(req.prompt_token_ids) == prompt_ids
    s = req.sampling
    assert (s.temperature, s.top_p, s.max_tokens, s.logprobs, req.n) == (1.0, 1.0, CTX - len(prompt_ids), None, 1)
    assert req.request_id == "req_abc123" and req.priority == Priority.BATCH
    body = render(tok, p)
    c = ChatCompletion.model_validate(body)
    assert c.id == "chatcmpl-abc123" and c.object == "chat.completion" and c.model == "tiny"
    assert c.choices[0].message.content == "Paris is the capital." and c.choices[0].finish_reason == "stop"
    assert body["choices"][0]["logprobs"] is None and body["choices"][0]["message"]["refusal"] is None
    n_completion = len(tok.encode("Paris is the capital."))
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids), "completion_tokens": n_completion,
        "total_tokens": len(prompt_ids) + n_completion, "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def test_chat_sampling_fields_and_extensions(tok):
    body = chat_body(temperature=0.3, top_p=0.9, n=3, stop=["\n", "END"], seed=42, frequency_penalty=0.5,
                     presence_penalty=-0.5, logit_bias={"5": -100, "7": 2.5}, top_k=20, min_p=0.05,
                     repetition_penalty=1.1, min_tokens=2, ignore_eos=True, stop_token_ids=[3],
                     skip_special_tokens=False, include_stop_str_in_output=True, max_completion_tokens=40,
                     user="u", metadata={"a": "b"}, store=False, service_tier="auto", safety_identifier="x",
                     prompt_cache_key="k", tool_choice="none", response_format={"type": "text"})
    (req,) = prep(tok, CHAT_ENDPOINT, body, priority=Priority.ONLINE).requests
    s = req.sampling
    assert req.n == 3 and req.priority == Priority.ONLINE
    assert (s.temperature, s.top_p, s.max_tokens, s.seed, s.top_k, s.min_p) == (0.3, 0.9, 40, 42, 20, 0.05)
    assert (s.frequency_penalty, s.presence_penalty, s.repetition_penalty) == (0.5, -0.5, 1.1)
    assert s.logit_bias == ((5, -100.0), (7, 2.5)) and s.stop == ("\n", "END") and s.stop_token_ids == (3,)
    assert s.min_tokens == 2 and s.ignore_eos and not s.skip_special_tokens and s.include_stop_str_in_output


def test_chat_max_tokens_alias(tok):
    assert prep(tok, CHAT_ENDPOINT, chat_body(max_tokens=7)).requests[0].sampling.max_tokens == 7
    same = prep(tok, CHAT_ENDPOINT, chat_body(max_tokens=7, max_completion_tokens=7))
    assert same.requests[0].sampling.max_tokens == 7
    with pytest.raises(InvalidRequest) as e:
        prep(tok, CHAT_ENDPOINT, chat_body(max_tokens=7, max_completion_tokens=8))
    assert e.value.code == "invalid_value" and e.value.param == "max_tokens"


def test_top_p_zero_means_greedy(tok):
    s = prep(tok, CHAT_ENDPOINT, chat_body(top_p=0)).requests[0].sampling
    assert s.greedy and s.top_p == 1.0


def test_chat_n_and_logprobs_render(tok):
    p = prep(tok, CHAT_ENDPOINT, chat_body(n=2, logprobs=True, top_logprobs=3))
    assert p.requests[0].sampling.logprobs == 3
    body = render(tok, p, logprobs=True)
    c = ChatCompletion.model_validate(body)
    assert [ch.index for ch in c.choices] == [0, 1]
    content = c.choices[0].logprobs.content
    ids = tok.encode("Paris is the capital.")
    assert [x.token for x in content] == [tok.token_text(i) for i in ids]
    assert content[0].bytes == tok.token_bytes(ids[0]) and content[0].logprob == -0.5
    assert len(content[0].top_logprobs) == 3 and content[0].top_logprobs[1].token == tok.token_text(5)
    assert body["choices"][0]["logprobs"]["refusal"] is None


def test_chat_logprobs_without_top(tok):
    p = prep(tok, CHAT_ENDPOINT, chat_body(logprobs=True))
    assert p.requests[0].sampling.logprobs == 0
    c = ChatCompletion.model_validate(render(tok, p, logprobs=True))
    assert all(x.top_logprobs == [] for x in c.choices[0].logprobs.content)


def test_minus_infinity_logprob_is_clamped(tok):
    p = prep(tok, CHAT_ENDPOINT, chat_body(logprobs=True, top_logprobs=1))
    (req,) = p.requests
    out = GenerationOutput(req.request_id, (ChoiceOutput(0, (5,), "x", FinishReason.LENGTH,
                                                         (TokenLogprob(5, float("-inf"), ((6, float("nan")),)),)),),
                           len(req.prompt_token_ids), 0, 1)
    body = render_response(p, [out], created=1)
    json.dumps(body, allow_nan=False)
    lp = body["choices"][0]["logprobs"]["content"][0]
    assert lp["logprob"] == -9999.0 and lp["top_logprobs"][0]["logprob"] == -9999.0
    assert body["choices"][0]["finish_reason"] == "length"


def test_aborted_or_failed_outputs_are_not_rendered(tok):
    p = prep(tok, CHAT_ENDPOINT, chat_body())
    rid = p.requests[0].request_id
    aborted = GenerationOutput(rid, (), 5, 0, 0, aborted=True)
    failed = GenerationOutput(rid, (), 5, 0, 0, error=RequestError(500, "boom", code="engine_error"))
    for out in (aborted, failed):
        assert first_failure([out]) is out
        with pytest.raises(ValueError):
            render_response(p, [out], created=1)


# ---- completions ------------------------------------------------------------------------------------

def comp_body(**changes):
    return {"model": "demo", "prompt": "The quick brown fox", **changes}


def test_completion_defaults(tok):
    p = prep(tok, COMPLETIONS_ENDPOINT, comp_body())
    (req,) = p.requests
    assert req.sampling.max_tokens == 16 and req.sampling.temperature == 1.0
    assert list(req.prompt_token_ids) == tok.encode("The quick brown fox")
    c = Completion.model_validate(render(tok, p))
    assert c.id == "cmpl-abc123" and c.object == "text_completion" and c.choices[0].text == "Paris is the capital."


@pytest.mark.parametrize("prompt, expected", [
    (["Hello", "world"], [["Hello"], ["world"]]),
    ([5, 6, 7], [[5, 6, 7]]),
    ([[5, 6], [7]], [[5, 6], [7]]),
])
def test_completion_prompt_forms(tok, prompt, expected):
    p = prep(tok, COMPLETIONS_ENDPOINT, comp_body(prompt=prompt, n=2))
    want = [tok.encode(x[0]) if isinstance(x[0], str) else x for x in expected]
    assert [list(r.prompt_token_ids) for r in p.requests] == want
    assert len({r.request_id for r in p.requests}) == len(want)
    body = render(tok, p)
    c = Completion.model_validate(body)
    assert [ch.index for ch in c.choices] == list(range(2 * len(want)))   # prompt_idx * n + i
    assert c.usage.prompt_tokens == sum(len(w) for w in want)


def test_completion_logprobs_and_echo_loglikelihood(tok):
    """lm-eval's loglikelihood: echo + logprobs + max_tokens 0 returns the prompt's logprobs."""
    p = prep(tok, COMPLETIONS_ENDPOINT, comp_body(echo=True, logprobs=1, max_tokens=0, temperature=0))
    (req,) = p.requests
    assert req.sampling.prompt_logprobs == 1 and req.sampling.logprobs == 1 and req.sampling.max_tokens == 0
    out = fake_output(tok, req, text="", finish=FinishReason.LENGTH, prompt_logprobs=True)
    body = render_response(p, [out], created=1)
    choice = body["choices"][0]
    assert choice["text"] == "The quick brown fox"
    lp = choice["logprobs"]
    ids = list(req.prompt_token_ids)
    assert lp["tokens"] == [tok.token_text(i) for i in ids]
    assert lp["token_logprobs"] == [None] + [-1.25] * (len(ids) - 1)      # OpenAI: no logprob for token 0
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {tok.token_text(ids[1]): -1.25}
    offsets = [0]
    for t in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp["text_offset"] == offsets
    # Everything but the null first entry is strict-valid.
    lp_rest = {k: v[1:] for k, v in lp.items()}
    Completion.model_validate({**body, "choices": [{**choice, "logprobs": lp_rest}]})


def test_completion_logprobs_without_echo(tok):
    p = prep(tok, COMPLETIONS_ENDPOINT, comp_body(logprobs=2))
    body = render(tok, p, logprobs=True)
    c = Completion.model_validate(body)
    ids = tok.encode("Paris is the capital.")
    assert c.choices[0].logprobs.tokens == [tok.token_text(i) for i in ids]
    assert c.choices[0].logprobs.text_offset[0] == 0 and len(c.choices[0].logprobs.top_logprobs[0]) <= 2


# ---- every 400 --------------------------------------------------------------------------------------

BAD_CHAT = [
    (dict(temperature=7), "temperature", "invalid_value"),
    (dict(temperature="hot"), "temperature", "invalid_type"),
    (dict(top_p=1.5), "top_p", "invalid_value"),
    (dict(n=0), "n", "invalid_value"),
    (dict(n=129), "n", "invalid_value"),
    (dict(guided_choice=["x" * 1000] * 70), "guided_choice", "invalid_value"),
    (dict(n=True), "n", "invalid_type"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop", "invalid_value"),
    (dict(stop=[1]), "stop", "invalid_type"),
    (dict(bogus=1), "bogus", "unknown_parameter"),
    (dict(top_logprobs=2), "top_logprobs", "invalid_value"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs", "invalid_value"),
    (dict(max_tokens=10_000), "messages", "context_length_exceeded"),
    (dict(max_tokens=0), "max_tokens", "invalid_value"),
    (dict(messages=[{"role": "user", "content": "x " * 400}]), "messages", "context_length_exceeded"),
    (dict(messages=[]), "messages", "invalid_value"),
    (dict(presence_penalty=3), "presence_penalty", "invalid_value"),
    (dict(frequency_penalty=-2.5), "frequency_penalty", "invalid_value"),
    (dict(logit_bias={"5": 101}), "logit_bias", "invalid_value"),
    (dict(logit_bias={"100000": 1}), "logit_bias", "invalid_value"),
    (dict(logit_bias={"x": 1}), "logit_bias", "invalid_value"),
    (dict(seed="x"), "seed", "invalid_type"),
    (dict(stop_token_ids=[100000]), "stop_token_ids", "invalid_value"),
    (dict(min_tokens=50, max_tokens=10), "min_tokens", "invalid_value"),
    (dict(repetition_penalty=0), "repetition_penalty", "invalid_value"),
    (dict(repetition_penalty=1e-320), "repetition_penalty", "invalid_value"),     # 0 in float32
    (dict(repetition_penalty=1e308), "repetition_penalty", "invalid_value"),      # inf in float32
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tool_choice", "unsupported_parameter"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto"), "tool_choice",
     "unsupported_parameter"),
    (dict(tool_choice="auto"), "tool_choice", "invalid_value"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"type": "function",
                                                                              "function": {"name": "g"}}),
     "tool_choice", "invalid_value"),
    (dict(tools=[{"type": "function"}], tool_choice="required"), "tools[0]", "invalid_value"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required", stream=True),
     "tools", "unsupported_parameter"),
    (dict(response_format={"type": "xml"}), "response_format.type", "invalid_value"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
     "response_format.json_schema.name", "invalid_value"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
     "response_format.json_schema.schema", "invalid_value"),
    (dict(guided_regex="(unclosed"), "guided_regex", "invalid_value"),
    (dict(guided_choice=[]), "guided_choice", "invalid_type"),
    (dict(guided_grammar="root ::= ("), "guided_grammar", "invalid_value"),
    (dict(guided_json="{not json"), "guided_json", "invalid_value"),
    (dict(guided_json="[" * 5000 + "]" * 5000), "guided_json", "invalid_value"),   # too deep to parse
    (dict(guided_choice=["a"], guided_regex="a"), "guided_choice", "invalid_value"),
    (dict(response_format={"type": "json_object"}, ignore_eos=True), "ignore_eos", "invalid_value"),
    (dict(logit_bias={str(i): 1 for i in range(301)}), "logit_bias", "invalid_value"),          # hostile lines
    (dict(stop=["x" * 1025]), "stop", "invalid_value"),
    (dict(stop_token_ids=list(range(257))), "stop_token_ids", "invalid_value"),
    (dict(messages=[{"role": "user", "content": "hi"}] * 2049), "messages", "invalid_value"),
    (dict(n=129), "n", "invalid_value"),
    (dict(guided_choice=["x" * 1000] * 70), "guided_choice", "invalid_value"),
    (dict(max_tokens=10**9), "messages", "context_length_exceeded"),
    (dict(audio={"voice": "x"}), "audio", "unsupported_parameter"),
    (dict(prediction={"type": "content"}), "prediction", "unsupported_parameter"),
    (dict(web_search_options={}), "web_search_options", "unsupported_parameter"),
    (dict(modalities=["text", "audio"]), "modalities", "unsupported_parameter"),
    (dict(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    (dict(echo=True), "echo", "unknown_parameter"),
]


@pytest.mark.parametrize("changes, param, code", BAD_CHAT)
def test_chat_rejections(tok, changes, param, code):
    with pytest.raises(InvalidRequest) as e:
        prep(tok, CHAT_ENDPOINT, chat_body(**changes))
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
    assert e.value.message and error_body(e.value)["error"]["type"] == "invalid_request_error"


BAD_COMPLETIONS = [
    (dict(best_of=2), "best_of", "unsupported_parameter"),
    (dict(suffix="tail"), "suffix", "unsupported_parameter"),
    (dict(logprobs=6), "logprobs", "invalid_value"),
    (dict(logprobs=True), "logprobs", "invalid_type"),
    (dict(prompt=[]), "prompt", "invalid_value"),
    (dict(prompt=""), "prompt", "invalid_value"),
    (dict(prompt=[[5], [100000]]), "prompt", "invalid_value"),
    (dict(prompt=[{"x": 1}]), "prompt", "invalid_type"),
    (dict(prompt="a " * 300), "prompt", "context_length_exceeded"),
    (dict(max_tokens=CTX, prompt="The quick brown fox"), "prompt", "context_length_exceeded"),
    (dict(max_tokens=-1), "max_tokens", "invalid_value"),
    (dict(messages=[]), "messages", "unknown_parameter"),
    (dict(top_logprobs=2), "top_logprobs", "unknown_parameter"),
    (dict(prompt=None), "prompt", "missing_required_parameter"),
]


@pytest.mark.parametrize("changes, param, code", BAD_COMPLETIONS)
def test_completion_rejections(tok, changes, param, code):
    with pytest.raises(InvalidRequest) as e:
        prep(tok, COMPLETIONS_ENDPOINT, comp_body(**changes))
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)


def test_unknown_model_is_404_model_not_found(tok):
    with pytest.raises(NotFound) as e:
        prep(tok, CHAT_ENDPOINT, chat_body(model="gpt-4o"))
    assert (e.value.status, e.value.param, e.value.code) == (404, "model", "model_not_found")


def test_stream_flags_for_online_use(tok):
    p = prep(tok, CHAT_ENDPOINT, chat_body(stream=True, stream_options={"include_usage": True}))
    assert p.stream and p.include_usage and p.requests[0].stream


def test_error_body_envelopes():
    err = RequestError(400, "too long", code="context_length_exceeded", param="messages")
    assert error_body(err) == {"error": {"message": "too long", "type": "invalid_request_error",
                                         "param": "messages", "code": "context_length_exceeded"}}
    assert error_body(RequestError(500, "died", code="engine_error"))["error"]["type"] == "server_error"
    assert error_body(InvalidRequest("bad", param="n", code="invalid_value"))["error"]["param"] == "n"


# ---- structured outputs ---------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_a_schema_becomes_the_engine_requests_grammar_once_for_equal_schemas(tok):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    first = prep(tok, CHAT_ENDPOINT, chat_body(response_format=fmt))
    again = prep(tok, CHAT_ENDPOINT, chat_body(response_format={"type": "json_schema", "json_schema": {
        "name": "y", "schema": dict(reversed(list(schema.items())))}}))   # same schema, other key order
    grammar = first.requests[0].sampling.grammar
    assert grammar and again.requests[0].sampling.grammar is grammar        # compiled once, shared
    assert prep(tok, CHAT_ENDPOINT, chat_body(response_format={"type": "text"})).requests[0].sampling.grammar is None
    for field in (dict(guided_choice=["a", "b"]), dict(guided_regex="[0-9]+"), dict(guided_json=schema),
                  dict(guided_grammar='root ::= "x" | "y"')):
        assert prep(tok, COMPLETIONS_ENDPOINT, {"model": "tiny", "prompt": "hi", **field}).requests[0].sampling.grammar


@pytest.mark.parametrize("tool_choice, text, name, arguments", [
    ("required", '{"name": "get_weather", "arguments": {"city": "Paris"}}', "get_weather", {"city": "Paris"}),
    ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "Oslo"}', "get_weather", {"city": "Oslo"}),
])
def test_a_forced_tool_call_is_rendered_as_tool_calls(tok, tool_choice, text, name, arguments):
    prepared = prep(tok, CHAT_ENDPOINT, chat_body(tools=[WEATHER], tool_choice=tool_choice))
    assert prepared.requests[0].sampling.grammar
    body = render(tok, prepared, text=text)
    ChatCompletion.model_validate(body, strict=True)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == name and json.loads(call["function"]["arguments"]) == arguments
    cut = render(tok, prepared, text=text[:10], finish=FinishReason.LENGTH)["choices"][0]   # max_tokens cut it
    assert cut["finish_reason"] == "length" and cut["message"]["content"] == text[:10]


def test_a_tool_call_nested_too_deeply_to_parse_stays_text(tok):
    """A free-form argument may nest deeper than json.loads recurses: that output is left as text
    (it was a RecursionError out of the renderer)."""
    free = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    prepared = prep(tok, CHAT_ENDPOINT, chat_body(tools=[free], tool_choice="required"))
    text = '{"name": "f", "arguments": {"a": ' + "[" * 5000 + "]" * 5000 + "}}"
    choice = render(tok, prepared, text=text)["choices"][0]
    assert choice["message"]["content"] == text and "tool_calls" not in choice["message"]


def test_tool_choice_none_leaves_the_output_free(tok):
    prepared = prep(tok, CHAT_ENDPOINT, chat_body(tools=[WEATHER], tool_choice="none"))
    assert prepared.requests[0].sampling.grammar is None and prepared.output.tool is None


def test_a_prompt_longer_than_the_context_can_hold_is_refused_without_tokenizing(tok, monkeypatch):
    text = "word " * (CTX * tok.max_token_chars)             # more characters than CTX tokens can hold
    calls = []
    monkeypatch.setattr(type(tok), "encode", lambda self, t, **kw: calls.append(len(t)) or [1])
    for endpoint, body, param in ((CHAT_ENDPOINT, chat_body(messages=[{"role": "user", "content": text}]), "messages"),
                                  ("/v1/completions", {"model": "tiny", "prompt": text}, "prompt")):
        with pytest.raises(InvalidRequest) as e:
            prep(tok, endpoint, body)
        assert (e.value.param, e.value.code) == (param, "context_length_exceeded")
        assert "characters" in e.value.message
    assert calls == [], "the long text was tokenized"


def test_truncating_a_very_long_prompt_tokenizes_only_its_tail_and_keeps_the_same_tokens(tok):
    words = [f"w{i % 97} " for i in range(CTX * tok.max_token_chars)]
    text = "".join(words)
    keep = 32
    request = prep(tok, "/v1/completions", {"model": "tiny", "prompt": text, "truncate_prompt_tokens": keep,
                                            "max_tokens": 4}).requests[0]
    assert list(request.prompt_token_ids) == tok.encode(text)[-keep:]
