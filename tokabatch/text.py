"""Text in and out of the model: tokenizer, chat templates, incremental detokenization, stop strings.

Does what transformers' tokenizer does, with the `tokenizers` library on the folder's tokenizer.json
and jinja2 on its chat template (tokabatch.chat_template), because the service tokenizes and must
stay torch-free: this module must not import torch or transformers, not even indirectly.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

from tokenizers import Tokenizer as _HFTokenizer

from tokabatch.chat_template import ChatTemplate, ChatTemplateError, normalize_messages
from tokabatch.errors import ModelLoadError

_REPLACEMENT = "\ufffd"
_UNKNOWN = object()


def _token_content(value: Any) -> str | None:
    """tokenizer_config writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: byte-level BPE spells each byte as one printable char."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _uses_byte_level(spec: dict | None) -> bool:
    if not spec:
        return False
    if spec.get("type") == "ByteLevel":
        return True
    return any(_uses_byte_level(s) for s in spec.get("decoders", []) or [])


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization_spaces (only when the tokenizer config asks for it)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


LONG_TEXT_CHARS = 65_536


class Tokenizer:
    """A model folder's tokenizer; ids and texts equal transformers' AutoTokenizer on the same folder."""

    def __init__(self, tokenizer: _HFTokenizer, config: dict, generation_config: dict,
                 chat_template: str | None) -> None:
        self._tok = tokenizer
        # A batch of n-sample lines renders one prompt many times (its Parquet "prompt" column):
        # the last few prompts given as token ids are decoded once.
        self.decode_prompt = functools.lru_cache(maxsize=64)(self._decode_prompt)
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = _token_content(config.get(key))
            if content is not None:
                self.special_tokens[key] = content
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id: int | None = tokenizer.token_to_id(bos) if bos else None
        self.eos_token_ids: tuple[int, ...] = self._eos_ids(generation_config)
        self._cleanup = bool(config.get("clean_up_tokenization_spaces", False))
        decoder = json.loads(tokenizer.to_str()).get("decoder")
        self._byte_level = _uses_byte_level(decoder)
        self._byte_decoder = _byte_decoder() if self._byte_level else {}
        self._chat = ChatTemplate(chat_template, self.special_tokens) if chat_template else None
        # Incremental detokenization fast path (see simple_piece), for the decoders where decoding
        # a window of ids is exactly a concatenation of per-token pieces.
        self._piece_kind = None if self._cleanup else (
            "join" if decoder is None else "bytes" if decoder.get("type") == "ByteLevel" else None)
        self._added_ids = frozenset(tokenizer.get_added_tokens_decoder())
        self._pieces: dict[int, str | None] = {}

    def _eos_ids(self, generation_config: dict) -> tuple[int, ...]:
        ids: list[int] = []
        eos = self.special_tokens.get("eos_token")
        if eos is not None and self._tok.token_to_id(eos) is not None:
            ids.append(self._tok.token_to_id(eos))
        extra = generation_config.get("eos_token_id")
        for i in extra if isinstance(extra, list) else ([extra] if isinstance(extra, int) else []):
            if i not in ids:
                ids.append(i)
        return tuple(ids)

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what grammar libraries build their token tries from)."""
        return self._tok.to_str()

    @classmethod
    def from_folder(cls, path: str | Path) -> "Tokenizer":
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"model folder {folder} has no tokenizer.json")
        try:
            tokenizer = _HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust library raises a bare Exception on a malformed file
            raise ModelLoadError(f"could not load {tokenizer_file}: {e}") from e
        config = _read_json(folder / "tokenizer_config.json")
        # transformers prefers chat_template.jinja over the copy in tokenizer_config.json.
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        if isinstance(template, list):   # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(tokenizer, config, _read_json(folder / "generation_config.json"), template)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest token's text in characters (its vocabulary piece, which is never shorter than
        the text it decodes to): a text of c characters is at least c / max_token_chars tokens, so a
        prompt too long for the context can be refused without tokenizing it."""
        return max(1, max(map(len, self._tok.get_vocab(with_added_tokens=True))))

    # ---- ids <-> text -----------------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if len(text) > LONG_TEXT_CHARS:
            # The same ids; tokenizers' batch call lets go of the GIL while it works, so a long prompt
            # (megabytes: seconds of work) encoded in a worker thread does not stall the event loop.
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self._cleanup else text

    def _decode_prompt(self, ids: tuple[int, ...]) -> str:
        """A prompt's text with its special tokens (as echo and the Parquet file show it); cached."""
        return self.decode(ids, skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        """The token's own text, as in the logprobs "token" field (U+FFFD for a partial character)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's raw UTF-8 bytes (a byte-level BPE token may hold part of a character)."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
        if self._byte_level and all(c in self._byte_decoder for c in piece):
            return [self._byte_decoder[c] for c in piece]
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):   # SentencePiece byte fallback
            return [int(piece[3:5], 16)]
        if self._byte_level:             # an added token stored as plain text
            return list(piece.encode("utf-8"))
        return list(piece.replace("\u2581", " ").encode("utf-8"))

    @property
    def joins_pieces_with_spaces(self) -> bool:
        """True when decode() joins the tokens' pieces with " " (a tokenizer without a decoder)."""
        return self._piece_kind == "join"

    def simple_piece(self, token_id: int) -> str | None:
        """The text this token adds after any window of simple tokens, or None if it is not simple.

        A token is simple when decode(window + [token]) == decode(window) + piece for every window
        of simple tokens (with " " before the piece for a space-joining tokenizer, when the window
        is not empty), so the incremental detokenizer can skip both decodes. That holds for an
        ordinary (not added) token of a byte-level tokenizer whose bytes are complete UTF-8 on their
        own (the decoder concatenates bytes, then decodes UTF-8), and of a tokenizer without a
        decoder (it joins token strings with spaces); never with clean_up_tokenization_spaces.
        Cached per id: computed once, on first use.
        """
        piece = self._pieces.get(token_id, _UNKNOWN)
        if piece is _UNKNOWN:
            piece = self._pieces[token_id] = self._simple_piece(token_id)
        return piece

    def _simple_piece(self, token_id: int) -> str | None:
        if self._piece_kind is None or token_id in self._added_ids:
            return None
        token = self._tok.id_to_token(token_id)
        if token is None:
            return None
        if self._piece_kind == "join":
            return token
        if not all(c in self._byte_decoder for c in token):
            return None
        try:
            return bytes(self._byte_decoder[c] for c in token).decode("utf-8")
        except UnicodeDecodeError:
            return None                  # part of a character: its text depends on its neighbours

    def detokenizer(self, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True
                    ) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens=skip_special_tokens)

    # ---- chat -------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, **template_kwargs: Any) -> str:
        """The prompt text the chat template makes of `messages` (raises ChatTemplateError, a 400)."""
        if self._chat is None:
            raise ChatTemplateError("this model has no chat template; use the completions endpoint")
        return self._chat.render(normalize_messages(messages, self._chat.source),
                                 add_generation_prompt=add_generation_prompt,
                                 continue_final_message=continue_final_message, **template_kwargs)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            continue_final_message: bool = False, **template_kwargs: Any) -> list[int]:
        """Prompt ids, as transformers' apply_chat_template(tokenize=True): the template places the specials."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                continue_final_message=continue_final_message, **template_kwargs)
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns generated ids into text one token at a time without splitting a UTF-8 character.

    Keeps a short window of ids: ids[:read_offset] produced the text already returned, the rest is
    held back. Each push decodes the whole window against the window without the held-back part;
    the difference is the new text. Text ending in U+FFFD is an incomplete character and stays held
    back until a later token completes it (or `flush`). When text comes out, the window restarts
    at the ids that made it (the old read offset), so the window stays a few ids long.

    Fast path, same text: when nothing is held back, the window holds only simple tokens and the new
    token is simple (Tokenizer.simple_piece), the difference is that token's piece, so neither
    decode runs. That is the usual case for byte-level tokenizers (Llama 3, Qwen, GPT-2 style)
    without clean-up; anything else takes the two decodes.
    """

    _CONTEXT = 5   # prompt tokens used as left context, so leading spaces decode as in the full text

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-self._CONTEXT:]) if prompt_ids else []
        self._read_offset = len(self._ids)
        self._space = " " if tokenizer.joins_pieces_with_spaces else ""
        self._pieces = tokenizer._pieces             # simple_piece's cache, read directly (hot path)
        self._window_simple = self._all_simple()     # ids[:read_offset] are all simple tokens

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def _all_simple(self) -> bool:
        piece = self._tokenizer.simple_piece
        return all(piece(i) is not None for i in self._ids[:self._read_offset])

    def push(self, token_id: int) -> str:
        """The new text since the last push ("" while a character is incomplete)."""
        return self.push_all((token_id,))

    def push_all(self, token_ids: Sequence[int]) -> str:
        """The text of pushing each id in turn (what the pushes return, joined), in one tight loop;
        in one join when nothing is held back and every id is simple with a piece that is not
        empty and holds no U+FFFD (each push would then return its piece: the text of a finished
        ignore_eos sequence, 256 ids, in ~a tenth of the loop's time)."""
        ids, cache, space = self._ids, self._pieces, self._space
        if token_ids and self._window_simple and self._read_offset == len(ids):
            pieces = list(map(cache.get, token_ids))      # None: not simple, or not looked up yet
            if not all(pieces):               # look those up (cached); None then means not simple
                piece_of = self._tokenizer.simple_piece
                pieces = [piece_of(t) if p is None else p for p, t in zip(pieces, token_ids)]
            if all(pieces):                   # (None: not simple; "": held back)
                text = space.join(pieces)
                if _REPLACEMENT not in text:
                    if space and ids:
                        text = space + text       # decode() joins with spaces: one before the first
                    ids[:] = (token_ids[-1],)     # the window restarts at the last token
                    self._read_offset = 1
                    return text
        out: list[str] = []
        for token_id in token_ids:
            if self._window_simple and self._read_offset == len(ids):      # nothing held back
                piece = cache.get(token_id, _UNKNOWN)
                if piece is _UNKNOWN:
                    piece = self._tokenizer.simple_piece(token_id)
                if piece is not None:
                    if space and ids:
                        piece = space + piece           # decode() joins with spaces: one before it
                    ids.append(token_id)
                    if piece and not piece.endswith(_REPLACEMENT):
                        del ids[:-1]                    # the window restarts at this token
                        self._read_offset = 1
                        out.append(piece)
                    continue                            # (else held back, exactly as the decodes would)
            out.append(self._push_decoding(token_id))
        return "".join(out)

    def _push_decoding(self, token_id: int) -> str:
        ids = self._ids
        ids.append(token_id)
        prefix_text = self._decode(0, self._read_offset)
        new_text = self._decode(0)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            del ids[:self._read_offset]
            self._read_offset = len(ids)
            self._window_simple = self._all_simple()
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """At the end: whatever was held back (an incomplete character decodes to U+FFFD, as decode() does)."""
        if self._read_offset == len(self._ids):
            new_text = prefix_text = ""       # nothing held back: both decodes would be the same text
        else:
            prefix_text = self._decode(0, self._read_offset)
            new_text = self._decode(0)
        self._ids.clear()
        self._read_offset = 0
        self._window_simple = True
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


class StopStringMatcher:
    """Finds stop strings in streamed text, across token boundaries, and cuts them from the output."""

    def __init__(self, stops: Sequence[str], *, include_stop: bool = False) -> None:
        self._stops = [s for s in dict.fromkeys(stops) if s]
        self._include = include_stop
        self._held = ""
        self.matched: str | None = None

    def _hold_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def feed(self, new_text: str) -> tuple[str, str | None]:
        """(text safe to emit now, the stop string that matched or None). After a match: ("", stop)."""
        if self.matched is not None:
            return "", self.matched
        text = self._held + new_text
        # The stop that completes first wins (as if the text came one character at a time), so the
        # result does not depend on how the text was chunked; the longer one when two end together.
        hits = [(text.find(s) + len(s), -len(s), s) for s in self._stops if s in text]
        if hits:
            end, _, stop = min(hits)
            start = end - len(stop)
            self.matched, self._held = stop, ""
            return text[: start + len(stop)] if self._include else text[:start], stop
        keep = self._hold_length(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], None

    def flush(self) -> str:
        """At the end (EOS or length): release the held-back text."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held


__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "StopStringMatcher", "Tokenizer", "clean_up_tokenization"]
