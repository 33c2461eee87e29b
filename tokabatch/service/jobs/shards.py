"""Sharded batches, the files' side: where a batch is cut, a shard's lines, its results published
as blobs, and the batch's files made from its shards' in shard order.

A batch of more than RunnerConfig.shard_lines lines is cut at validation into shards: ranges of
positions in the batch's feed order (ordering.py: the file clustered by prompt start, or file order
with ordering off), cut where prompts change so that lines sharing a prompt run on one engine.
That order is rebuilt identically from the file by whichever worker claims a shard, so a shard row
needs only its two positions. A shard runs like a small batch (runner.py) in a work folder of its
own, `<work>/<batch id>/<shard id>/`, which is its checkpoint; when all its lines are written, its
output, error and Parquet-row files become blobs under ids derived from the shard (the blob store
every worker shares), and the shard row gets its outcome and counts (storage/shards.py). The
claim that ends the batch concatenates the shards' blobs in shard order into the batch's own work
folder and seals it as any batch's (seal.py). Must not import torch or aiohttp.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import OrderedDict
from pathlib import Path

from tokabatch.service.jobs.feed import Span
from tokabatch.service.jobs.job import Job
from tokabatch.service.jobs.ordering import clustered_spans, file_spans
from tokabatch.service.jobs.outputs import ERROR_NAME, OUTPUT_NAME, ROWS_NAME, ResultTotals, ResultWriter
from tokabatch.service.jobs.seal import derived_file_id, link_or_copy
from tokabatch.service.storage.blobs import BlobStore
from tokabatch.service.storage.models import Batch, Shard
from tokabatch.service.storage.shards import ShardCounts

PARTS = (OUTPUT_NAME, ERROR_NAME, ROWS_NAME)


def part_id(shard: Shard, name: str, claim: int | None = None) -> str:
    """The blob id of one of a shard's published files: a function of the shard, the file and the
    claim that wrote it (the shard row's num_claims), so a runner whose claim lapsed cannot publish
    over the files of the claim that ends the shard (the row's outcome is written by that one only)."""
    return derived_file_id(f"{shard.id}#{shard.num_claims if claim is None else claim}", name)


def shard_counts(totals: ResultTotals) -> ShardCounts:
    return ShardCounts(request_completed=totals.num_completed, request_failed=totals.num_failed,
                       input_tokens=totals.input_tokens, cached_tokens=totals.cached_tokens,
                       output_tokens=totals.output_tokens, reasoning_tokens=totals.reasoning_tokens,
                       total_tokens=totals.total_tokens)


class FeedOrders:
    """The feed order of the batches this worker ran shards of lately (rebuilt from the input file:
    a pass over it, about a second per 50,000 lines), so a worker's next shard of a batch reads none."""

    def __init__(self, keep: int = 2) -> None:
        self._orders: OrderedDict[str, list[Span]] = OrderedDict()
        self._keep = keep

    async def of(self, batch: Batch, input_path: Path, *, clustered: bool) -> list[Span]:
        order = self._orders.pop(batch.id, None)
        if order is None:
            order = await asyncio.to_thread(clustered_spans if clustered else file_spans, input_path)
        self._orders[batch.id] = order
        while len(self._orders) > self._keep:
            self._orders.popitem(last=False)
        return order


def publish(blobs: BlobStore, job: Job) -> None:
    """The shard's written files as blobs (the work folder closed first), under this claim's ids
    (part_id: one publication per claim, so nothing to look up first). Blocking."""
    assert job.shard is not None
    job.writer.close()
    for name in PARTS:
        blob_id = part_id(job.shard, name)
        source, temp = job.writer.work_dir / name, blobs.temp_path(blob_id)
        if source.exists():
            link_or_copy(source, temp)       # the file is not written again: the shard is done
        else:
            temp.write_bytes(b"")
        blobs.commit(temp, blob_id)


def merge(blobs: BlobStore, shards: list[Shard], writer: ResultWriter) -> None:
    """The batch's output, error and Parquet-row files in `writer`'s folder: each the concatenation
    of its shards' blobs in shard order (input order by range); the counts summed from the shard
    rows. Blocking; overwrites what an interrupted merge left."""
    writer.work_dir.mkdir(parents=True, exist_ok=True)
    for name in PARTS:
        with (writer.work_dir / name).open("wb") as out:
            for shard in shards:
                with blobs.local(part_id(shard, name)).open("rb") as part:
                    shutil.copyfileobj(part, out, 1 << 20)
    totals = ResultTotals()
    for shard in shards:
        totals.num_completed += shard.request_completed
        totals.num_failed += shard.request_failed
        totals.input_tokens += shard.input_tokens
        totals.cached_tokens += shard.cached_tokens
        totals.output_tokens += shard.output_tokens
        totals.reasoning_tokens += shard.reasoning_tokens
    writer.totals = totals


def forget(blobs: BlobStore, shards: list[Shard]) -> None:
    """Delete the shards' published blobs, of every claim (once the batch's own files are sealed)."""
    for shard in shards:
        for claim in range(1, shard.num_claims + 1):
            for name in PARTS:
                blobs.delete(part_id(shard, name, claim))


__all__ = ["FeedOrders", "forget", "merge", "part_id", "publish", "shard_counts"]
