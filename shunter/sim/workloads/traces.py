"""Request traces: the built-in registry and readers for their three file formats.

Formats, told apart by the first line (gzip or plain text):
- Azure LLM inference CSV: `TIMESTAMP` (wall clock), `ContextTokens`, `GeneratedTokens`.
- Mooncake JSONL: `timestamp` (ms), `input_length`, `output_length`, optional `hash_ids`.
- Length-only CSV (ShareGPT stats): `num_prefill_tokens`, `num_decode_tokens`; no arrivals.
Arrival times come out in seconds from the trace's first request, sorted.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Iterator, TextIO

import numpy as np

from shunter.sim.workloads.request import PRIVATE_TOKEN_BASE

SYNTHETIC = "synthetic"  # not a file: lengths and arrivals generated from the spec

_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_LENGTH_COLUMNS = ("num_prefill_tokens", "num_decode_tokens")
_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")


@dataclass(frozen=True)
class BuiltinTrace:
    """A trace shipped in `shunter/sim/traces/`.

    quantum_s: the resolution its time stamps were rounded to, if coarse
        (spread out on loading unless the spec says otherwise).
    """

    file: str
    has_arrival_times: bool = True
    quantum_s: float | None = None


TRACES: dict[str, BuiltinTrace] = {
    "azure2023_conv": BuiltinTrace("azure2023_conv.csv.gz"),
    "azure2023_code": BuiltinTrace("azure2023_code.csv.gz"),
    "mooncake_conversation": BuiltinTrace("mooncake_conversation.jsonl.gz", quantum_s=3.0),
    "mooncake_synthetic": BuiltinTrace("mooncake_synthetic.jsonl.gz"),
    "sharegpt": BuiltinTrace("sharegpt.csv.gz", has_arrival_times=False),
}


def list_traces() -> list[str]:
    """Every name `WorkloadSpec.trace` accepts besides a file path."""
    return [*TRACES, SYNTHETIC]


@dataclass
class Trace:
    """A trace in columns; row i of every column is request i of the file (sorted by arrival).

    arrival_times: seconds from the first request, or None for a length-only trace.
    row_ids: each request's 0-based row in the file, for stable request ids.
    prefix_block_ids: per request its `hash_ids` (None for a row without), or None.
    quantum_s: the resolution of coarse time stamps, if any.
    """

    name: str
    arrival_times: np.ndarray | None
    num_prompt_tokens: np.ndarray
    num_output_tokens: np.ndarray
    row_ids: np.ndarray
    prefix_block_ids: list[tuple[int, ...] | None] | None = None
    quantum_s: float | None = None

    def __len__(self) -> int:
        return len(self.num_prompt_tokens)


def read_trace(trace: str) -> Trace:
    """Read a built-in trace by name, or any file in one of the three formats."""
    builtin = TRACES.get(trace)
    if builtin is None:
        path = Path(trace)
        if not path.is_file():
            raise ValueError(f"trace file {trace} does not exist (built-in traces: {', '.join(list_traces())})")
        return read_trace_file(path, _stem(path))
    with resources.as_file(resources.files("shunter.sim") / "traces" / builtin.file) as path:
        result = read_trace_file(path, trace)
    result.quantum_s = builtin.quantum_s
    return result


def read_trace_file(path: Path, name: str) -> Trace:
    """Parse one trace file; ValueError naming the file (and line) on bad content."""
    with _open_text(path) as f:
        lines = enumerate(f, start=1)
        for first_no, first in lines:
            if first.strip():
                break
        else:
            raise ValueError(f"trace file {path} is empty")
        if first.lstrip().startswith("{"):
            columns = _read_mooncake(path, first_no, first, lines)
        else:
            columns = _read_csv(path, first, lines)
    if not columns[1]:
        raise ValueError(f"trace file {path} holds no requests")
    return _sorted_trace(name, *columns)


def _open_text(path: Path) -> TextIO:
    with open(path, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"
    # newline="" hands CRLF to the csv module intact; json ignores a trailing "\r".
    return gzip.open(path, "rt", newline="") if is_gzip else open(path, newline="")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".csv", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def _read_csv(path: Path, header_line: str, lines: Iterator[tuple[int, str]]) -> tuple:
    header = [c.strip().lstrip("\ufeff") for c in next(csv.reader([header_line]))]
    if all(c in header for c in _AZURE_COLUMNS):
        return _read_csv_rows(path, lines, *(header.index(c) for c in _AZURE_COLUMNS))
    if all(c in header for c in _LENGTH_COLUMNS):
        return _read_csv_rows(path, lines, None, *(header.index(c) for c in _LENGTH_COLUMNS))
    wanted = max((_AZURE_COLUMNS, _LENGTH_COLUMNS), key=lambda cols: sum(c in header for c in cols))
    missing = [c for c in wanted if c not in header]
    raise ValueError(f"trace file {path} lacks column(s) {', '.join(missing)} (has {', '.join(header)}; "
                     f"an Azure CSV needs {', '.join(_AZURE_COLUMNS)}, a length CSV {', '.join(_LENGTH_COLUMNS)})")


def _read_csv_rows(path: Path, lines: Iterator[tuple[int, str]], t_col: int | None, p_col: int,
                   o_col: int) -> tuple:
    """Columns of an Azure CSV, or of a length-only one when `t_col` is None."""
    times: list[float] | None = None if t_col is None else []
    prompts, outputs = [], []
    line_no = 0
    try:
        for line_no, line in lines:
            if not line.strip():
                continue
            row = next(csv.reader([line]))
            if times is not None:
                stamp = datetime.fromisoformat(row[t_col].strip())
                if stamp.tzinfo is None:  # the Azure traces state no zone; only differences matter
                    stamp = stamp.replace(tzinfo=timezone.utc)
                times.append(stamp.timestamp())
            prompts.append(_count(row[p_col]))
            outputs.append(_count(row[o_col]))
    except (ValueError, IndexError, csv.Error) as e:
        raise _bad_row(path, line_no, e) from None
    return times, prompts, outputs, None


def _read_mooncake(path: Path, first_no: int, first: str, lines: Iterator[tuple[int, str]]) -> tuple:
    try:
        head = json.loads(first)
    except ValueError as e:
        raise _bad_row(path, first_no, e) from None
    missing = [k for k in _MOONCAKE_KEYS if not isinstance(head, dict) or k not in head]
    if missing:
        raise ValueError(f"trace file {path} lacks key(s) {', '.join(missing)} (a Mooncake JSONL trace "
                         f"needs {', '.join(_MOONCAKE_KEYS)}, and optionally hash_ids)")
    times, prompts, outputs, blocks = [], [], [], []
    line_no = first_no
    try:
        for line_no, line in itertools.chain([(first_no, first)], lines):
            if not line.strip():
                continue
            record = json.loads(line)
            times.append(_milliseconds(record["timestamp"]) / 1000.0)
            prompts.append(_count(record["input_length"]))
            outputs.append(_count(record["output_length"]))
            blocks.append(_block_ids(record.get("hash_ids")))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _bad_row(path, line_no, e) from None
    return times, prompts, outputs, blocks


def _count(value: object) -> int:
    """A token count: a positive integer (an int, or a string of digits)."""
    if isinstance(value, str):
        value = int(value)
    if type(value) is not int or value <= 0:
        raise ValueError(f"token count must be a positive integer, got {value!r}")
    return value


def _milliseconds(value: object) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError(f"timestamp must be a number of milliseconds, got {value!r}")
    return float(value)


def _block_ids(value: object) -> tuple[int, ...] | None:
    if value is None:
        return None
    ids = tuple(value)
    if any(type(h) is not int for h in ids) or ids and (min(ids) < 0 or max(ids) >= PRIVATE_TOKEN_BASE):
        raise ValueError(f"hash_ids must be integers in [0, 2**40), got {value!r}")
    return ids


def _bad_row(path: Path, line_no: int, error: Exception) -> ValueError:
    if isinstance(error, KeyError):
        reason = f"missing key {error}"
    elif isinstance(error, json.JSONDecodeError):
        reason = f"bad JSON: {error.msg}"  # its own line/column count the one line we parsed
    else:
        reason = "too few fields" if isinstance(error, IndexError) else str(error)
    return ValueError(f"trace file {path}, line {line_no}: cannot parse row ({reason})")


def _sorted_trace(name: str, times, prompts, outputs, blocks) -> Trace:
    """Columns as arrays, sorted by arrival (stable, so file order breaks ties)."""
    prompts = np.asarray(prompts, dtype=np.int64)
    outputs = np.asarray(outputs, dtype=np.int64)
    if times is None:
        return Trace(name, None, prompts, outputs, np.arange(len(prompts)))
    times = np.asarray(times, dtype=np.float64)
    order = np.argsort(times, kind="stable")
    if blocks is not None:
        blocks = None if all(b is None for b in blocks) else [blocks[i] for i in order.tolist()]
    times = times[order]
    return Trace(name, times - times[0], prompts[order], outputs[order], order, blocks)
