"""Streaming bodies (`stream: true` on the online endpoints): chat.completion.chunk and
text_completion chunks, as OpenAI sends them in server-sent events.

`StreamRenderer(prepared, created=...)` turns the engine's GenerationUpdates into chunk dicts:
`start()` (chat: one role chunk per choice; completions with echo: the prompt text), `update(u)`
per GenerationUpdate, and `finish(outputs)` (the usage chunk when stream_options.include_usage).
The HTTP layer writes each as `data: <json>\\n\\n` and ends with `data: [DONE]`. Reuses the
per-choice pieces of render_body. Text-completion chunks carry `finish_reason: null` until a choice
ends, as OpenAI sends them (the SDK reuses its non-nullable Completion type for them).
Must not import torch or aiohttp.
"""

from __future__ import annotations

from typing import Any

from tokabatch.engine.api import GenerationOutput, GenerationUpdate
from tokabatch.service.jobs.render import CHAT_ENDPOINT, PreparedRequest
from tokabatch.service.jobs.render_body import (
    chat_logprobs, completion_logprobs, finish_reason, system_fingerprint, usage,
)


class StreamRenderer:
    def __init__(self, prepared: PreparedRequest, *, created: int) -> None:
        self.prepared = prepared
        self.created = created
        self.chat = prepared.endpoint == CHAT_ENDPOINT
        self._prompt_idx = {r.request_id: i for i, r in enumerate(prepared.requests)}
        self._text_offsets: dict[int, int] = {}   # completions: characters already sent per choice index

    def _chunk(self, choices: list[dict]) -> dict:
        chunk: dict[str, Any] = {
            "id": self.prepared.response_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created, "model": self.prepared.model, "choices": choices,
            "system_fingerprint": system_fingerprint(self.prepared.model),
        }
        if self.prepared.include_usage:
            chunk["usage"] = None
        return chunk

    def start(self) -> list[dict]:
        """Chunks to send before any token: the assistant role (chat) or the echoed prompt (completions)."""
        n = self.prepared.n
        if self.chat:
            return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]) for i in range(n)]
        if not self.prepared.echo:
            return []
        chunks = []
        for prompt_idx, text in enumerate(self.prepared.prompt_texts):
            for i in range(n):
                index = prompt_idx * n + i
                self._text_offsets[index] = len(text)
                chunks.append(self._chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": None}]))
        return chunks

    def update(self, update: GenerationUpdate) -> list[dict]:
        """One chunk per choice delta of this update."""
        prepared, tok = self.prepared, self.prepared.tokenizer
        prompt_idx = self._prompt_idx[update.request_id]
        chunks = []
        for delta in update.deltas:
            reason = finish_reason(delta.finish_reason) if delta.finish_reason is not None else None
            if self.chat:
                logprobs = None
                if prepared.logprobs is not None and delta.logprobs:
                    logprobs = chat_logprobs(tok, delta.logprobs, prepared.logprobs)
                content = {"content": delta.text} if delta.text or reason is None else {}
                chunks.append(self._chunk([{"index": delta.index, "delta": content, "logprobs": logprobs,
                                            "finish_reason": reason}]))
                continue
            index = prompt_idx * prepared.n + delta.index
            offset = self._text_offsets.get(index, 0)
            logprobs = None
            if prepared.logprobs is not None and delta.logprobs:
                logprobs = completion_logprobs(tok, delta.logprobs, delta.token_ids, prepared.logprobs,
                                               text_offset0=offset)
            self._text_offsets[index] = offset + len(delta.text)
            chunks.append(self._chunk([{"index": index, "text": delta.text, "logprobs": logprobs,
                                        "finish_reason": reason}]))
        return chunks

    def finish(self, outputs: list[GenerationOutput]) -> list[dict]:
        """The final usage chunk (choices empty) when the client asked for it."""
        if not self.prepared.include_usage:
            return []
        chunk = self._chunk([])
        chunk["usage"] = usage(outputs)
        return [chunk]


__all__ = ["StreamRenderer"]
