"""Sealing a batch's work folder: the output and error files become registered files without their
bytes being copied where the work folder and the files share a filesystem (a hard link), by a copy
where they do not, and the sealed files outlive the work folder."""

from __future__ import annotations

import os
import shutil

import pytest

from tokabatch.service.jobs import seal
from tokabatch.service.jobs.outputs import ResultWriter
from tokabatch.service.storage import repo


async def _sealed(db, blobs, tmp_path):
    batch = await repo.create_batch(db, owner="o", input_file_id="file-x", endpoint="/v1/completions",
                                    completion_window="24h", now_s=1000, window_s=86400)
    writer = ResultWriter(tmp_path / "work")
    writer.open()
    writer.write_response("ok", status_code=200, request_id="req_1", body={"usage": None})
    writer.write_error("bad", code="batch_expired", message="expired")
    sealed = await seal.seal_results(db, blobs, batch, writer, now_s=2000)
    return writer, sealed


@pytest.mark.parametrize("links", [True, False])
async def test_sealed_files_hold_the_work_files_and_outlive_the_folder(db, blobs, tmp_path, monkeypatch, links):
    if not links:
        def no_link(source, target):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(seal.os, "link", no_link)
    writer, sealed = await _sealed(db, blobs, tmp_path)
    expected = {sealed.output_file_id: writer.output_path.read_bytes(),
                sealed.error_file_id: writer.error_path.read_bytes()}
    for file_id, work_path in ((sealed.output_file_id, writer.output_path), (sealed.error_file_id, writer.error_path)):
        assert os.path.samefile(blobs.path(file_id), work_path) == links
    shutil.rmtree(writer.work_dir)
    for file_id, data in expected.items():
        assert blobs.path(file_id).read_bytes() == data and data.endswith(b"\n")
        assert (await repo.get_file(db, file_id, owner="o")).bytes == len(data)
