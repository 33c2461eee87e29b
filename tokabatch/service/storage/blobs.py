"""File bytes on disk: <data_dir>/files/<file_id>, always written to a temporary name and renamed.

Owns where a file's bytes live and how they get there atomically: a crash leaves either the
whole file or a `*.tmp` leftover (swept by `remove_stale_temps`), never a half file under a real
id. Uploads stream through `BlobWriter` (bounded buffer, disk writes in a thread so the event loop
stays responsive); the runner writes its outputs to `temp_path(id)` itself and calls `commit`.
Rows live in repo.py: write the blob first, then `repo.create_file`. Must not import torch/aiohttp.

Where the bytes of record live is the store's: here the folder itself; in ObjectStoreBlobs
(object_blobs.py, `serve --blobs s3://...`) a bucket, with this folder as the host's cache. So
code that reads a blob's bytes asks for `local(file_id)` (blocking: the bytes may be fetched
first), and `path(file_id)` is only where they are, or will be, on this host.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from pathlib import Path
from typing import BinaryIO

FLUSH_BYTES = 1 << 20   # hand the disk write to a thread once this much is buffered
_HOST = socket.gethostname().replace(".", "_")
_OWNER = f"{_HOST}-{os.getpid()}"


def _owner_is_gone(name: str) -> bool:
    """Whether a temporary's name says this host's process wrote it and that process has exited."""
    parts = name.split(".")                      # "", file id, host-pid, token, "tmp"
    if len(parts) != 5:
        return False
    host, _, pid = parts[2].rpartition("-")
    if host != _HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False                             # alive, another user's
    return False


class BlobStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        """Where a committed file's bytes live (it exists only after `commit`)."""
        if not file_id or "/" in file_id or file_id.startswith("."):
            raise ValueError(f"not a file id: {file_id!r}")
        return self.root / file_id

    def temp_path(self, file_id: str) -> Path:
        """A fresh temporary name beside the final one (same filesystem, so rename is atomic), naming
        its owner (host and process) so that a crashed owner's leftovers can be swept at once."""
        return self.root / f".{file_id}.{_OWNER}.{secrets.token_hex(4)}.tmp"

    def commit(self, temp: Path, file_id: str) -> int:
        """fsync `temp` and rename it to `path(file_id)`; returns its size in bytes."""
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        final = self.path(file_id)
        os.replace(temp, final)
        return final.stat().st_size

    def delete(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)

    def exists(self, file_id: str) -> bool:
        return self.path(file_id).is_file()

    def check(self) -> None:
        """Raise ConfigError when the store cannot be used (a bucket's; a folder always can)."""

    def local(self, file_id: str) -> Path:
        """A file on this host with the blob's bytes (FileNotFoundError when there is no such blob).
        Blocking: run it in a thread from async code."""
        path = self.path(file_id)
        if not path.is_file():
            raise FileNotFoundError(f"no blob {file_id}")
        return path

    def remove_stale_temps(self, older_than_s: float = 3600.0) -> int:
        """Delete temporaries left by a crash: those of a process of this host that is gone, and any
        older than `older_than_s` (another host's process sharing the folder may be writing a fresh one)."""
        cutoff = time.time() - older_than_s
        stale = []
        for p in self.root.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_mtime < cutoff or _owner_is_gone(p.name):
                    stale.append(p)
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def writer(self, file_id: str) -> "BlobWriter":
        return BlobWriter(self, file_id)


class BlobWriter:
    """Streams bytes to a temporary file; `commit()` makes them the file's, `abort()` drops them.

    Usage: `w = blobs.writer(fid); await w.write(chunk)...; size = await w.commit()`, with
    `await w.abort()` on any failure.
    """

    def __init__(self, store: BlobStore, file_id: str) -> None:
        self.store = store
        self.file_id = file_id
        self.temp = store.temp_path(file_id)
        self.num_bytes = 0
        self._buffer = bytearray()
        self._file: BinaryIO | None = open(self.temp, "wb")

    async def write(self, data: bytes) -> None:
        self.num_bytes += len(data)
        self._buffer += data
        if len(self._buffer) >= FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if self._buffer and self._file is not None:
            chunk, self._buffer = bytes(self._buffer), bytearray()
            await asyncio.to_thread(self._file.write, chunk)

    async def commit(self) -> int:
        await self._flush()
        assert self._file is not None, "BlobWriter already finished"
        self._file.close()
        self._file = None
        return await asyncio.to_thread(self.store.commit, self.temp, self.file_id)

    async def abort(self) -> None:
        """Drop the bytes: the temporary file is removed even when closing it fails (a full disk)."""
        file, self._file = self._file, None
        try:
            if file is not None:
                with contextlib.suppress(OSError):
                    file.close()
        finally:
            self.temp.unlink(missing_ok=True)


__all__ = ["BlobStore", "BlobWriter"]
