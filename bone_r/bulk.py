"""Bulk prediction over folders: deterministic shards (`--shard i/N`), resumable streamed outputs (JSON Lines and
CSV, one complete block per image, appended and flushed as each image finishes) and decoding ahead of the model on
worker threads. `inference.py` is the command; the logic lives here. Research and teaching tool, not a diagnosis.

A folder's entries are sorted by their path relative to the folder (so two machines that mount it at different
places agree) and shard ``i`` of ``N`` takes every N-th one starting at ``i``: the N shards are disjoint, cover the
folder exactly once, and differ in size by at most one image.
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bone_r.detection import CSV_FIELDS, csv_rows

T = TypeVar("T")
R = TypeVar("R")

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


class ShardSpecError(ValueError):
    """A ``--shard`` value that is not ``i/N`` with 0 <= i < N: the message is one line for a person."""


class ResumeError(ValueError):
    """An output file that cannot be resumed (not ours, or damaged before its last record)."""


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, items: list[T], key: Callable[[T], str] = str) -> list[T]:
        """This shard's part of `items`: every `count`-th item, in the order of `key`, starting at `index`."""
        ordered = sorted(items, key=key)
        return ordered[self.index :: self.count]


ALL = Shard(0, 1)


def parse_shard(spec: str) -> Shard:
    """``"i/N"`` (0-based, as SLURM's ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`` with ``--array=0-(N-1)``)."""
    match = _SHARD.fullmatch(spec or "")
    if not match:
        raise ShardSpecError(f"--shard must be i/N with whole numbers (e.g. 0/4), got {spec!r}")
    index, count = int(match[1]), int(match[2])
    if count < 1:
        raise ShardSpecError(f"--shard {spec}: the number of shards N must be at least 1")
    if index >= count:
        raise ShardSpecError(f"--shard {spec}: the shard index i must lie in 0..{count - 1} (it is 0-based)")
    return Shard(index, count)


def relative_key(folder: Path) -> Callable[[Path], str]:
    """The sort key of a folder entry: its path below `folder`, with '/' separators."""
    return lambda path: Path(path).relative_to(folder).as_posix()


# --------------------------------------------------------------------------- streamed, resumable outputs


@dataclass
class _Block:
    image: str
    end: int  # byte offset just after the block


def _jsonl_blocks(data: bytes, path: Path) -> list[_Block]:
    blocks, pos = [], 0
    for number, line in enumerate(data.split(b"\n")[:-1], 1):  # the part after the last newline is a torn tail
        pos += len(line) + 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ResumeError(f"{path}: line {number} is not a JSON record; it was not written by a run that could "
                              "be resumed (only a torn last line is repaired)") from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise ResumeError(f"{path}: line {number} is not a prediction record (no 'image')")
        blocks.append(_Block(record["image"], pos))
    return blocks


def _csv_blocks(data: bytes, path: Path) -> list[_Block]:
    """One block per image: its rows (``max(1, n_detections)`` of them, ranked 1..n); an image whose rows end early
    is dropped with everything after it, like a torn line."""
    cut = data.rfind(b"\n") + 1
    text = data[:cut].decode("utf-8")
    lines = text.splitlines(keepends=True)
    if not lines:
        return []
    if next(csv.reader([lines[0]]), []) != CSV_FIELDS:
        raise ResumeError(f"{path}: the header is not Bone-R's CSV header; not resuming into it")
    blocks: list[_Block] = []
    pos = len(lines[0].encode())
    image, expected, seen = "", 0, 0
    for number, line in enumerate(lines[1:], 2):
        pos += len(line.encode())
        row = next(csv.reader([line]), None)
        if not row:
            continue
        if len(row) != len(CSV_FIELDS):
            raise ResumeError(f"{path}: line {number} has {len(row)} fields, not {len(CSV_FIELDS)}")
        rec = dict(zip(CSV_FIELDS, row))
        if seen and rec["image"] != image:
            break  # the previous image's rows ended early (a torn write): cut from there
        if not seen:
            try:
                image, expected = rec["image"], max(1, int(rec["n_detections"] or 0))
            except ValueError:
                raise ResumeError(f"{path}: line {number}: n_detections is not a number") from None
        seen += 1
        if seen == expected:
            blocks.append(_Block(image, pos))
            seen = 0
    return blocks


class StreamedOutput:
    """A JSON Lines or CSV file that grows one image at a time and can be resumed.

    Each image's text is written with one ``write`` and flushed, so a killed run leaves at most its last image
    torn: `resume` finds the complete images and cuts anything after the last one, so that the torn image is
    predicted again instead of being skipped or left as a broken line.
    """

    def __init__(self, path: Path, kind: str):
        if kind not in ("jsonl", "csv"):
            raise ValueError(f"unknown streamed output kind {kind!r}")
        self.path, self.kind = Path(path), kind
        self._fh: io.TextIOBase | None = None

    def blocks(self) -> list[_Block]:
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        return _jsonl_blocks(data, self.path) if self.kind == "jsonl" else _csv_blocks(data, self.path)

    def truncate(self, blocks: list[_Block], keep: int) -> int:
        """Keep the first `keep` blocks (and the CSV header); bytes after them are cut. Returns the bytes cut."""
        if not self.path.is_file():
            return 0
        size = self.path.stat().st_size
        if keep:
            end = blocks[keep - 1].end
        elif self.kind == "csv":
            data = self.path.read_bytes()
            end = data.find(b"\n") + 1 if data.startswith(",".join(CSV_FIELDS).encode()) else 0
        else:
            end = 0
        if end < size:
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
        return size - end

    def open(self, append: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not append or not self.path.is_file() or self.path.stat().st_size == 0
        self._fh = open(self.path, "w" if fresh else "a", newline="", encoding="utf-8")
        if fresh and self.kind == "csv":
            self._write(",".join(CSV_FIELDS) + "\r\n")

    def write(self, record: dict[str, Any]) -> None:
        if self.kind == "jsonl":
            text = json.dumps(record, separators=(",", ":")) + "\n"
        else:
            buffer = io.StringIO()
            csv.DictWriter(buffer, fieldnames=CSV_FIELDS).writerows(csv_rows(record))
            text = buffer.getvalue()
        self._write(text)

    def _write(self, text: str) -> None:
        assert self._fh is not None, "open() first"
        self._fh.write(text)
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@dataclass
class ResumeState:
    done: set[str]  # images already in every output
    cut_bytes: dict[str, int]  # per output path: bytes removed (a torn or partial last image)


def resume(outputs: list[StreamedOutput]) -> ResumeState:
    """Images complete in every output (in the same order: outputs are written image by image, together);
    everything past them is cut from each file, so appending continues from a clean end."""
    per_output = [out.blocks() for out in outputs]
    keep = 0
    if per_output:
        common = min(len(b) for b in per_output)
        while keep < common and len({b[keep].image for b in per_output}) == 1:
            keep += 1
    done = {b.image for b in per_output[0][:keep]} if per_output else set()
    cut = {str(out.path): out.truncate(blocks, keep) for out, blocks in zip(outputs, per_output)}
    return ResumeState(done, cut)


# --------------------------------------------------------------------------- decoding ahead of the model


def executor(kind: str, workers: int) -> Executor:
    """The pool that decodes ahead: ``thread`` (OpenCV and the DICOM codecs release the GIL) or ``process``."""
    if kind == "thread":
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    if kind == "process":
        return ProcessPoolExecutor(max_workers=workers)
    raise ValueError(f"unknown worker kind {kind!r}: thread or process")


def prefetch(fn: Callable[[T], R], items: Iterable[T], workers: int = 0, kind: str = "thread") -> Iterator[tuple[T, R | BaseException]]:
    """``(item, fn(item))`` in the order of `items`, with up to `workers` calls running ahead of the consumer
    (0: no pool, one at a time). An exception from `fn` is yielded in place of its result, not raised.
    At most ``workers + 1`` images are held at once (the one being used, `workers` being decoded), so memory stays bounded by the decode budget per image."""
    items = list(items)
    if workers <= 0:
        for item in items:
            try:
                yield item, fn(item)
            except Exception as err:  # noqa: BLE001 - handed to the consumer, which reports it per image
                yield item, err
        return
    with executor(kind, workers) as pool:
        pending: list[tuple[T, Future]] = []
        queue = iter(items)
        for item in queue:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= workers:
                break
        while pending:
            item, future = pending.pop(0)
            for nxt in queue:  # one more in flight for the one taken
                pending.append((nxt, pool.submit(fn, nxt)))
                break
            try:
                yield item, future.result()
            except Exception as err:  # noqa: BLE001
                yield item, err

