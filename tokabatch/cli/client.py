"""A small synchronous client for tokabatch's OpenAI Files + Batch API, for the CLI.

Stdlib only (urllib): the CLI must run where neither torch nor the openai package is installed,
and it needs exact control of errors so each failure becomes one line. Server errors arrive as
OpenAI's envelope {"error": {"message", "type", "param", "code"}} and become `CliError`s with
exit code 2 for a 4xx (the request was wrong) and 1 otherwise. Must not import the service.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from tokabatch.cli.common import EXIT_ERROR, EXIT_USAGE, CliError

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
_CHUNK_BYTES = 1 << 20


def resolve_connection(base_url: str | None, api_key: str | None) -> tuple[str, str]:
    """Flags win over OPENAI_BASE_URL / OPENAI_API_KEY; the default is the local server."""
    url = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CliError(f"the server URL must look like http://host:port/v1, not {url!r} (--base-url or "
                       "OPENAI_BASE_URL)", EXIT_USAGE)
    return url.rstrip("/"), key


@dataclass
class ApiClient:
    base_url: str
    api_key: str
    timeout_s: float = 60.0

    # -- transport ---------------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, body: bytes | Iterable[bytes] | None = None,
                 content_type: str | None = None, content_length: int | None = None,
                 query: dict[str, Any] | None = None):
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if content_length is not None:                 # a streamed body: urllib sends it as it comes
            headers["Content-Length"] = str(content_length)
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as e:
            raise _http_error(e, method, path) from None
        except urllib.error.URLError as e:
            raise CliError(f"cannot reach the server at {self.base_url}: {e.reason} "
                           "(is `tokabatch serve` running? set --base-url or OPENAI_BASE_URL)", EXIT_ERROR) from None
        except (ConnectionError, TimeoutError) as e:
            raise CliError(f"cannot reach the server at {self.base_url}: {e}", EXIT_ERROR) from None

    def _json(self, method: str, path: str, payload: dict | None = None, **kwargs: Any) -> dict:
        body = json.dumps(payload).encode() if payload is not None else None
        with self._request(method, path, body=body, content_type="application/json" if body else None,
                           **kwargs) as resp:
            raw = resp.read()
        try:
            return json.loads(raw)
        except ValueError:
            raise CliError(f"{method} {path}: the server sent a body that is not JSON", EXIT_ERROR) from None

    # -- files -------------------------------------------------------------------------------------
    def upload_file(self, path: Path, purpose: str = "batch") -> dict:
        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"{path.name.replace(chr(34), '_')}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = path.stat().st_size
        with path.open("rb") as f:                     # streamed: a 150 MB file is not held in memory
            with self._request("POST", "/files", body=_multipart_body(head, f, size, tail),
                               content_type=f"multipart/form-data; boundary={boundary}",
                               content_length=len(head) + size + len(tail)) as resp:
                return json.loads(resp.read())

    def list_files(self, purpose: str | None = None) -> list[dict]:
        return self._paginate("/files", {"purpose": purpose, "limit": 10000})

    def delete_file(self, file_id: str) -> dict:
        return self._json("DELETE", f"/files/{_q(file_id)}")

    def retrieve_file(self, file_id: str) -> dict:
        return self._json("GET", f"/files/{_q(file_id)}")

    def download_file(self, file_id: str, out: BinaryIO) -> int:
        """Stream a file's bytes into `out`; returns the number of bytes."""
        with self._request("GET", f"/files/{_q(file_id)}/content") as resp:
            num_bytes = 0
            while chunk := resp.read(_CHUNK_BYTES):
                out.write(chunk)
                num_bytes += len(chunk)
        return num_bytes

    def download_file_to(self, file_id: str, path: Path) -> int:
        """Download into `path` atomically (a partial download never replaces a good file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        try:
            with tmp.open("wb") as out:
                num_bytes = self.download_file(file_id, out)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return num_bytes

    # -- batches -----------------------------------------------------------------------------------
    def create_batch(self, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict[str, str] | None, *, dry_run: bool = False) -> dict:
        """The created batch; with `dry_run`, the server's report on the file instead (nothing is created)."""
        payload: dict[str, Any] = {"input_file_id": input_file_id, "endpoint": endpoint,
                                   "completion_window": completion_window}
        if metadata:
            payload["metadata"] = metadata
        if dry_run:
            payload["dry_run"] = True
        return self._json("POST", "/batches", payload)

    def retry_batch(self, batch_id: str, *, include_all: bool = False) -> dict:
        return self._json("POST", f"/batches/{_q(batch_id)}/retry", {"all": include_all})

    def list_retries(self, batch_id: str) -> list[dict]:
        """The batches created by retrying `batch_id` (its children, newest first)."""
        return self._paginate("/batches", {"limit": 100, "parent_batch_id": batch_id})

    def retrieve_batch(self, batch_id: str) -> dict:
        return self._json("GET", f"/batches/{_q(batch_id)}")

    def cancel_batch(self, batch_id: str) -> dict:
        return self._json("POST", f"/batches/{_q(batch_id)}/cancel")

    def list_batches(self, limit: int | None = None) -> list[dict]:
        return self._paginate("/batches", {"limit": 100}, max_items=limit)

    def _paginate(self, path: str, query: dict[str, Any], max_items: int | None = None) -> list[dict]:
        items: list[dict] = []
        after: str | None = None
        while True:
            page = self._json("GET", path, query={**query, "after": after})
            data = page.get("data") or []
            items.extend(data)
            if max_items is not None and len(items) >= max_items:
                return items[:max_items]
            if not page.get("has_more") or not data:
                return items
            after = data[-1]["id"]


def _q(object_id: str) -> str:
    return urllib.parse.quote(object_id, safe="")


def _multipart_body(head: bytes, f: BinaryIO, size: int, tail: bytes) -> Iterator[bytes]:
    """The upload's body a chunk at a time: exactly `size` bytes of `f` (its size when the upload
    began, which the Content-Length promised) between the form's head and tail."""
    yield head
    left = size
    while left > 0 and (chunk := f.read(min(_CHUNK_BYTES, left))):
        left -= len(chunk)
        yield chunk
    if left:
        raise CliError(f"{getattr(f, 'name', 'the file')} shrank while it was being uploaded", EXIT_ERROR)
    yield tail


def _http_error(e: urllib.error.HTTPError, method: str, path: str) -> CliError:
    """The server's error envelope as one line; 4xx -> exit 2 (the request was wrong), else 1."""
    try:
        raw = e.read()
        err = json.loads(raw).get("error") or {}
        message = err.get("message") or raw.decode("utf-8", "replace")[:200]
    except (ValueError, AttributeError, OSError):
        message = e.reason or "no details"
    code = EXIT_USAGE if 400 <= e.code < 500 and e.code not in (401, 408, 429) else EXIT_ERROR
    return CliError(f"{method} {path} -> HTTP {e.code}: {message}", code)
