"""--backend URLs and --backends files."""

from __future__ import annotations

import pytest

from shunter.errors import CLIError
from shunter.gateway.backends import BackendSpec, read_backends


def test_urls_and_a_file_with_labels(tmp_path):
    path = tmp_path / "backends.txt"
    path.write_text("# fleet\nhttp://127.0.0.1:8002/v1/  model=a,b gpu=h100\n\nhttp://127.0.0.1:8003 role=mixed\n")
    specs = read_backends(["http://127.0.0.1:8001"], str(path))
    assert [s.url for s in specs] == ["http://127.0.0.1:8001", "http://127.0.0.1:8002", "http://127.0.0.1:8003"]
    assert specs[1] == BackendSpec("http://127.0.0.1:8002", ("a", "b"), "h100", {"model": "a,b", "gpu": "h100"})


@pytest.mark.parametrize("line, message", [
    ("ftp://x:1", r"is not an http\(s\) URL"),
    ("http://127.0.0.1:8001 colour=red", "labels are model=VALUE"),
    ("http://127.0.0.1:8001 role=prefill", "remote backends can only be mixed"),
])
def test_bad_lines_are_named(tmp_path, line, message):
    path = tmp_path / "b.txt"
    path.write_text(line + "\n")
    with pytest.raises(CLIError, match=message):
        read_backends(None, str(path))


def test_a_backend_listed_twice_is_refused():
    with pytest.raises(CLIError, match="listed twice"):
        read_backends(["http://127.0.0.1:8001", "http://127.0.0.1:8001/v1"], None)
