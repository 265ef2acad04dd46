"""The SDK's streamed multipart body: the same bytes however it is read, parsed back by werkzeug, with progress."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from werkzeug.formparser import parse_form_data

from flowpool.multipart import MultipartBody


def _body(tmp_path: Path, progress: list[tuple[int, int]] | None = None) -> tuple[MultipartBody, bytes]:
    big, empty = tmp_path / "big.json", tmp_path / "empty.json"
    content = os.urandom(300_000)
    big.write_bytes(content)
    empty.write_bytes(b"")
    files = {"script_file": ("wf.py", b"def execute(ctx):\n    return 1\n"),
             "accessory_big": ('we"ird.json', big), "accessory_empty": ("empty.json", empty)}
    record = None if progress is None else (lambda sent, total: progress.append((sent, total)))
    return MultipartBody({"workflow_ref_name": "w", "env": '{"A": "1"}'}, files, record), content


@pytest.mark.parametrize("size", [1, 7, 8192, 1 << 20, -1])
def test_the_body_parses_back_to_its_fields_and_files_whatever_the_read_size(tmp_path: Path, size: int) -> None:
    body, content = _body(tmp_path)
    pieces = []
    while piece := body.read(size):
        pieces.append(piece)
    data = b"".join(pieces)

    assert len(data) == len(body)
    _, form, files = parse_form_data({"wsgi.input": io.BytesIO(data), "CONTENT_LENGTH": str(len(data)),
                                      "CONTENT_TYPE": body.content_type, "REQUEST_METHOD": "POST"})
    assert form.to_dict() == {"workflow_ref_name": "w", "env": '{"A": "1"}'}
    assert files["accessory_big"].read() == content
    assert files["accessory_big"].filename == 'we"ird.json'  # quoted as browsers do, read back whole
    assert files["accessory_empty"].read() == b""
    assert files["script_file"].read() == b"def execute(ctx):\n    return 1\n"


def test_progress_counts_every_byte_up_to_the_total(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    body, _ = _body(tmp_path, seen)
    while body.read(65536):
        pass

    assert [sent for sent, _ in seen] == sorted(sent for sent, _ in seen)
    assert seen[-1] == (len(body), len(body))
    assert len(seen) == -(-len(body) // 65536)
