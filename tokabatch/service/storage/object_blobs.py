"""Blobs in an S3-compatible bucket (`serve --blobs s3://bucket/prefix`), for servers and workers on
several hosts: the bucket holds the bytes of record, the local blob folder is this host's cache.

Through obstore (the Python binding of Rust's object_store crate): one small wheel without
dependencies (s3fs would bring aiobotocore and botocore), credentials and endpoint from the usual
AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL,
AWS_ALLOW_HTTP for a plain-http endpoint), and streaming both ways: a commit uploads the committed
file from disk in multipart chunks, a read downloads into the cache chunk by chunk, so no file is
ever whole in memory. Blobs are never rewritten under one id (file ids are new or derived from
their batch or shard claim), so a cached copy is never stale. Must not import torch or aiohttp.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tokabatch.errors import ConfigError
from tokabatch.service.storage.blobs import BlobStore

CHUNK_BYTES = 8 << 20                    # multipart upload parts and download chunks


class ObjectStoreBlobs(BlobStore):
    """BlobStore over a bucket, with `cache_dir` as the local copy of what this host wrote or read."""

    def __init__(self, url: str, cache_dir: Path | str) -> None:
        from obstore.store import from_url

        super().__init__(cache_dir)
        self.url = url
        self.store = from_url(url)

    def check(self) -> None:
        """ConfigError (one line at start-up) when the bucket cannot be reached or read with the credentials."""
        import obstore

        try:
            next(iter(obstore.list(self.store, chunk_size=1)), None)      # a missing bucket fails here, not on HEAD
        except Exception as exc:
            raise ConfigError(f"the blob store {self.url} cannot be used: {' '.join(str(exc).split())[:500]}",
                              param="blobs") from None

    def commit(self, temp: Path, file_id: str) -> int:
        """Commit locally (the cache), then upload; the blob exists for other hosts once uploaded."""
        import obstore

        size = super().commit(temp, file_id)
        obstore.put(self.store, file_id, self.path(file_id), chunk_size=CHUNK_BYTES)
        return size

    def delete(self, file_id: str) -> None:
        import obstore

        super().delete(file_id)
        with contextlib.suppress(FileNotFoundError):
            obstore.delete(self.store, file_id)

    def exists(self, file_id: str) -> bool:
        import obstore

        if super().exists(file_id):
            return True
        try:
            obstore.head(self.store, file_id)
        except FileNotFoundError:
            return False
        return True

    def local(self, file_id: str) -> Path:
        """The cached copy, downloaded first (to a temporary name, then renamed) when this host has none."""
        import obstore

        path = self.path(file_id)
        if path.is_file():
            return path
        temp = self.temp_path(file_id)
        try:
            with temp.open("wb") as f:
                for chunk in obstore.get(self.store, file_id).stream(min_chunk_size=CHUNK_BYTES):
                    f.write(chunk)
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        return path


__all__ = ["ObjectStoreBlobs"]
