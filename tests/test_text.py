"""tokabatch.text against transformers' AutoTokenizer on the demo model (transformers only in tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokabatch.text import ChatTemplateError, StopStringMatcher, Tokenizer

TEXTS = [
    "Hello, world!",
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\r\n",
    "Ünïcödé çharacters: àéîõü ß Œ",
    "Emoji: 😀🚀👩‍👩‍👧‍👦 🇫🇷 ❤️",
    "中文字符和日本語のテキスト、한국어",
    "Mixed 中文 and English with 数字 123456789",
    "def f(x):\n    return x ** 2  # code\n",
    "<|im_start|>user\nHi<|im_end|>\n",
    "text with <|endoftext|> inside",
    "<|im_end|><|im_end|>",
    "a" * 300,
    "Numbers: 3.14159, -42, 1e10, 0xFF",
    "Punctuation!!! ??? ... --- ''' \"\"\"",
    "URL https://example.com/path?q=1&r=2#frag",
    "Zero-width\u200bjoiner\u200d and combining e\u0301",
    "Math: ∑ ∫ √ ∞ ≠ ≤ ≥ → ←",
    "Ἀρχιμήδης and Привет мир and مرحبا",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}],
    [
        {"role": "user", "content": "Tell me a joke 😀"},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why? 中文"},
    ],
    [{"role": "user", "content": "  spaces  \n\n newlines \t"}],
    [{"role": "system", "content": "Sys"}, {"role": "user", "content": "<|im_end|> injected"}],
]


@pytest.fixture(scope="module")
def ours(demo_model_path: Path) -> Tokenizer:
    return Tokenizer.from_folder(demo_model_path)


@pytest.fixture(scope="module")
def hf(demo_model_path: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(demo_model_path))


def test_special_ids_and_vocab(ours: Tokenizer, hf) -> None:
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id
    assert hf.eos_token_id in ours.eos_token_ids


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours: Tokenizer, hf, text: str) -> None:
    ids = ours.encode(text)
    assert ids == hf(text)["input_ids"]
    assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours: Tokenizer, hf, index: int, add_generation_prompt: bool) -> None:
    messages = CONVERSATIONS[index]
    expected_text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                          return_dict=True)["input_ids"]
    assert ours.render_chat(messages, add_generation_prompt=add_generation_prompt) == expected_text
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected_ids


def test_continue_final_message_matches_transformers(ours: Tokenizer, hf) -> None:
    messages = [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two,"}]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                      continue_final_message=True)
    assert ours.render_chat(messages, add_generation_prompt=False, continue_final_message=True) == expected
    assert expected.endswith("One, two,")


def test_content_parts_and_developer_role(ours: Tokenizer) -> None:
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]
    assert ours.render_chat(parts) == ours.render_chat(plain)
    with pytest.raises(ValueError, match="image_url"):
        ours.render_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ChatTemplateError):
        ours.render_chat([])


@pytest.mark.parametrize("text", [t for t in TEXTS if t] + ["😀😃😄 中文测试 🇫🇷🇩🇪 done", "é" * 20 + "🚀" * 10])
def test_incremental_detokenizer_equals_decode(ours: Tokenizer, text: str) -> None:
    ids = ours.encode(text, add_special_tokens=False)
    for skip in (True, False):
        detok = ours.detokenizer(skip_special_tokens=skip)
        pieces = [detok.push(i) for i in ids]
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text
        assert "".join(pieces) + detok.flush() == ours.decode(ids, skip_special_tokens=skip)


def test_incremental_detokenizer_with_prompt_context(ours: Tokenizer) -> None:
    prompt = ours.apply_chat_template([{"role": "user", "content": "Hi 中文"}])
    generated = ours.encode(" Hello there 🚀 中文 friend", add_special_tokens=False)
    detok = ours.detokenizer(prompt)
    text = "".join(detok.push(i) for i in generated) + detok.flush()
    assert text == ours.decode(generated)


def test_incremental_detokenizer_holds_incomplete_character(ours: Tokenizer) -> None:
    ids = ours.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1, "the rocket emoji should span several byte-level tokens"
    detok = ours.detokenizer()
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1]) == "🚀"


def test_token_text_and_bytes(ours: Tokenizer, hf) -> None:
    ids = ours.encode("Hi 中文 🚀", add_special_tokens=False)
    assert b"".join(bytes(ours.token_bytes(i)) for i in ids).decode("utf-8") == "Hi 中文 🚀"
    for i in ids:
        assert ours.token_text(i) == hf.decode([i])
    im_end = ours.encode("<|im_end|>", add_special_tokens=False)
    assert len(im_end) == 1
    assert ours.token_text(im_end[0]) == "<|im_end|>"
    assert bytes(ours.token_bytes(im_end[0])) == b"<|im_end|>"


def _feed_all(matcher: StopStringMatcher, chunks: list[str]) -> tuple[str, str | None]:
    out = []
    for chunk in chunks:
        text, stop = matcher.feed(chunk)
        out.append(text)
        if stop is not None:
            return "".join(out), stop
    return "".join(out) + matcher.flush(), None


def test_stop_strings_across_boundaries() -> None:
    assert _feed_all(StopStringMatcher(["END"]), ["Hello E", "N", "D trailing"]) == ("Hello ", "END")
    assert _feed_all(StopStringMatcher(["END"], include_stop=True), ["Hello E", "ND!"]) == ("Hello END", "END")
    assert _feed_all(StopStringMatcher(["END"]), ["Hello E", "Nope"]) == ("Hello ENope", None)
    assert _feed_all(StopStringMatcher(["\n\n", "###"]), ["a\n", "b#", "#", "#c"]) == ("a\nb", "###")
    assert _feed_all(StopStringMatcher(["abc", "b"]), ["a", "bc"]) == ("a", "b")
    assert _feed_all(StopStringMatcher(["xx"]), ["ends with x"]) == ("ends with x", None)


def test_stop_strings_hold_back_only_possible_prefixes() -> None:
    matcher = StopStringMatcher(["<stop>"])
    assert matcher.feed("text <st") == ("text ", None)
    assert matcher.feed("x") == ("<stx", None)
    assert matcher.feed("<") == ("", None)
    assert matcher.flush() == "<"


def test_stop_strings_on_real_tokens(ours: Tokenizer) -> None:
    text = "The answer is 42.\n\nUser: next question"
    ids = ours.encode(text, add_special_tokens=False)
    detok, matcher = ours.detokenizer(), StopStringMatcher(["\n\nUser:"])
    out, stop = _feed_all(matcher, [detok.push(i) for i in ids])
    assert (out, stop) == ("The answer is 42.", "\n\nUser:")


def test_import_does_not_import_torch() -> None:
    code = "import sys, tokabatch.text, tokabatch.model_store; print('torch' in sys.modules, 'transformers' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_stop_strings_do_not_depend_on_chunking() -> None:
    import random

    rng = random.Random(0)
    stops = ["ab", "bca", "cc", "abcab"]
    for _ in range(300):
        text = "".join(rng.choice("abcx") for _ in range(rng.randint(0, 20)))
        one_char = _feed_all(StopStringMatcher(stops), list(text))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(3, len(text) + 1)))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert _feed_all(StopStringMatcher(stops), chunks) == one_char
        if one_char[1] is None:
            assert one_char[0] == text
        else:
            assert one_char[1] not in one_char[0] and text.startswith(one_char[0] + one_char[1])
