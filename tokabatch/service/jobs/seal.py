"""Sealing a batch's results: the work folder's JSONL + Parquet become registered files.

Idempotent, so a crash at any moment of finalizing is repaired by running it again: file ids are
derived from the batch id (the same batch always gets the same output/error/parquet ids), a blob
is copied in only if it is not there yet, and a row is created only if it does not exist yet.
Must not import torch or aiohttp.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

from tokabatch.service.jobs.outputs import ResultWriter, write_parquet
from tokabatch.service.storage import repo
from tokabatch.service.storage.blobs import BlobStore
from tokabatch.service.storage.db import Database
from tokabatch.service.storage.models import Batch

_BASE62 = string.digits + string.ascii_letters
OUTPUT_PURPOSE = "batch_output"          # both the output and the error file (contract §2.6)


@dataclass(frozen=True, slots=True)
class SealedFiles:
    output_file_id: str | None
    error_file_id: str | None
    output_parquet_file_id: str


def derived_file_id(batch_id: str, kind: str) -> str:
    """`file-` + 22 base62 characters, a pure function of (batch id, kind)."""
    number = int.from_bytes(hashlib.blake2b(f"{batch_id}:{kind}".encode(), digest_size=17).digest(), "big")
    chars = []
    for _ in range(22):
        number, r = divmod(number, 62)
        chars.append(_BASE62[r])
    return "file-" + "".join(chars)


async def _register(db: Database, blobs: BlobStore, batch: Batch, source: Path, kind: str, filename: str,
                    now_s: int) -> str:
    file_id = derived_file_id(batch.id, kind)
    if not await asyncio.to_thread(blobs.exists, file_id):
        temp = blobs.temp_path(file_id)
        await asyncio.to_thread(link_or_copy, source, temp)
        await asyncio.to_thread(blobs.commit, temp, file_id)
    if await repo.get_file(db, file_id, owner=None) is None:
        expires_at = now_s + batch.output_expires_after_s if batch.output_expires_after_s else None
        await repo.create_file(db, owner=batch.owner, filename=filename, purpose=OUTPUT_PURPOSE,
                               num_bytes=blobs.path(file_id).stat().st_size, now_s=now_s,
                               expires_at=expires_at, file_id=file_id)
    return file_id


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the work folder and the files share a filesystem (no bytes copied: the
    sealed work file is never written again, and the folder is removed once the batch is terminal),
    else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


async def seal_results(db: Database, blobs: BlobStore, batch: Batch, writer: ResultWriter, *,
                       now_s: int) -> SealedFiles:
    """Close the writer, write the Parquet file, register output/error (only when non-empty) and
    Parquet (always) as files of the batch's owner."""
    writer.close()
    parquet_path = writer.work_dir / "output.parquet"
    await asyncio.to_thread(write_parquet, writer.rows_path, parquet_path)
    output_id = error_id = None
    if writer.totals.num_completed:
        output_id = await _register(db, blobs, batch, writer.output_path, "output",
                                    f"{batch.id}_output.jsonl", now_s)
    if writer.totals.num_failed:
        error_id = await _register(db, blobs, batch, writer.error_path, "error", f"{batch.id}_error.jsonl", now_s)
    parquet_id = await _register(db, blobs, batch, parquet_path, "parquet", f"{batch.id}_output.parquet", now_s)
    return SealedFiles(output_id, error_id, parquet_id)


__all__ = ["OUTPUT_PURPOSE", "SealedFiles", "derived_file_id", "link_or_copy", "seal_results"]
