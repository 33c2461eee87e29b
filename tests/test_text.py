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
    code = ("import sys, tokabatch.text, tokabatch.model_store; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
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


def _reference_pieces(tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool) -> list[str]:
    """The two-decode incremental algorithm, with no fast path and no trimming: what
    IncrementalDetokenizer must return push for push (its fast path skips the decodes)."""
    window = list(prompt[-5:])
    prefix, read = 0, len(window)
    out = []
    for i in ids:
        window.append(i)
        before = tok.decode(window[prefix:read], skip_special_tokens=skip)
        after = tok.decode(window[prefix:], skip_special_tokens=skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            prefix, read = read, len(window)
            out.append(after[len(before):])
        else:
            out.append("")
    before = tok.decode(window[prefix:read], skip_special_tokens=skip)
    after = tok.decode(window[prefix:], skip_special_tokens=skip)
    out.append(after[len(before):] if len(after) > len(before) else "")
    return out


def _pieces(tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool) -> list[str]:
    """push by push, then flush; and push_all (one call for every id) must give the same text,
    also with simple_piece's cache empty (push_all's one-join path looks the pieces up itself)."""
    tok._pieces.clear()
    at_once = tok.detokenizer(prompt, skip_special_tokens=skip)
    cut = len(ids) // 3
    text = at_once.push_all(ids[:cut]) + at_once.push_all(ids[cut:])
    detok = tok.detokenizer(prompt, skip_special_tokens=skip)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert text == "".join(pieces[:-1])
    assert at_once.flush() == pieces[-1]
    return pieces


def _random_ids(rng, tok: Tokenizer, special: list[int]) -> list[int]:
    """Ids of real text, random ids (byte-level: many are parts of characters) and added tokens."""
    kind = rng.random()
    if kind < 0.4:
        ids = tok.encode(rng.choice(TEXTS) + rng.choice(TEXTS), add_special_tokens=False)
    else:
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 30))]
    for _ in range(rng.randint(0, 3)):
        ids.insert(rng.randint(0, len(ids)), rng.choice(special))
    return ids


def test_incremental_detokenizer_fast_path_equals_two_decodes(ours: Tokenizer) -> None:
    import random

    rng = random.Random(1)
    special = sorted(ours._added_ids)
    for _ in range(300):
        prompt = _random_ids(rng, ours, special)
        ids = _random_ids(rng, ours, special)
        skip = rng.random() < 0.5
        assert _pieces(ours, prompt, ids, skip) == _reference_pieces(ours, prompt, ids, skip), (prompt, ids, skip)


def test_simple_pieces_of_a_byte_level_tokenizer(ours: Tokenizer) -> None:
    hello = ours.encode(" Hello", add_special_tokens=False)
    assert len(hello) == 1 and ours.simple_piece(hello[0]) == " Hello"
    rocket = ours.encode("🚀", add_special_tokens=False)
    assert len(rocket) > 1 and all(ours.simple_piece(i) is None for i in rocket), "parts of a character"
    assert ours.simple_piece(ours.encode("<|im_end|>", add_special_tokens=False)[0]) is None, "added token"


def test_incremental_detokenizer_without_a_decoder(tmp_path: Path) -> None:
    """A tokenizer without a decoder (the benchmarks' WordLevel one) joins tokens with spaces."""
    import json
    import random

    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {f"t{i}": i for i in range(50)} | {"": 50, "\ufffd": 51}
    hf_tok = HFTokenizer(WordLevel(vocab, unk_token="t0"))
    hf_tok.pre_tokenizer = WhitespaceSplit()
    hf_tok.add_special_tokens([AddedToken("<eos>", special=True)])
    hf_tok.add_tokens([AddedToken("<tool>", special=False)])
    hf_tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.joins_pieces_with_spaces and tok.simple_piece(7) == "t7" and tok.simple_piece(52) is None
    rng = random.Random(2)
    for _ in range(300):
        prompt = [rng.randrange(54) for _ in range(rng.randint(0, 7))]
        ids = [rng.randrange(54) for _ in range(rng.randint(0, 20))]
        skip = rng.random() < 0.5
        assert _pieces(tok, prompt, ids, skip) == _reference_pieces(tok, prompt, ids, skip), (prompt, ids, skip)
    detok = tok.detokenizer([3, 4])
    assert [detok.push(i) for i in (5, 6)] == [" t5", " t6"]
