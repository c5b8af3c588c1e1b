"""Hostile uploads (issue 16) against a local Bone-R service started under a memory cap.

Every input is built here from code (pydicom, OpenJPEG, zlib, OpenCV; no binary fixtures):
decompression bombs, a frame-count lie, a progressive-JPEG scan bomb, parse bombs, corrupt and
odd DICOM, slow clients, and repeated failing uploads. The service runs as a child process
(`uvicorn app.main:app` on 127.0.0.1) with its address space capped by `RLIMIT_AS`, and its RSS
is sampled every 20 ms. Per case the table gives the HTTP status, the seconds to the answer,
the peak RSS while it ran and the RSS after it; the summary gives the baseline, the peak
(the kernel's high-water mark) and the RSS at the end.

    .venv/bin/python -m scripts.hostile_inputs --mem-cap-mb 3072 --json runs/hostile_inputs.json

The builders are also used by tests/test_hostile_inputs.py, at sizes that keep each test fast.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- builders


def dicom(pixel_data: bytes, rows: int, cols: int, *, syntax: str = "1.2.840.10008.1.2.1", bits: int = 8,
          frames: int | None = None, **tags) -> bytes:
    """A minimal DX DICOM file around `pixel_data` (already encoded for `syntax`), written by pydicom."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OB" if bits == 8 or ds.file_meta.TransferSyntaxUID.is_compressed else "OW"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def j2k_frames_dicom(side: int = 10_000, frames: int = 40, declared: int = 1) -> bytes:
    """JPEG 2000 DICOM of `frames` identical side x side frames of zeros that declares NumberOfFrames=`declared`.

    A zero image encodes to ~200 bytes whatever its size (one empty packet per precinct), so the
    frame is encoded small and its SIZ header rewritten to side x side (the codestream stays valid).
    """
    from openjpeg.utils import encode_array
    from pydicom.encaps import encapsulate

    small = encode_array(np.zeros((256, 256), np.uint8))
    assert small[:4] == b"\xff\x4f\xff\x51"  # SOC, SIZ
    size = struct.pack(">II", side, side)
    frame = small[:8] + size + small[16:24] + size + small[32:]  # Xsiz, Ysiz; XTsiz, YTsiz (one tile)
    return dicom(encapsulate([frame] * frames), side, side, syntax="1.2.840.10008.1.2.4.90", frames=declared)


def deflated_dicom(inflated_mb: float = 500.0) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM whose PixelData inflates to `inflated_mb` MB of zeros.

    Compressed as a stream (1 MB of zeros at a time), so building it costs no memory.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.filewriter import write_file_meta_info

    plain = dicom(b"", 512, 512)  # 8-bit 512 x 512 declared; the pixel data is far larger
    fp = io.BytesIO(plain)
    read_preamble(fp, False)
    meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, vr, length: tag >> 16 != 2)
    body = plain[fp.tell():]
    body = body[: body.index(b"\xe0\x7f\x10\x00")]  # the dataset up to its (empty) PixelData
    n = int(inflated_mb * 1e6)
    from pydicom.dataset import FileMetaDataset

    meta = FileMetaDataset(meta)
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=False)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [plain[:132], head.getvalue(), packer.compress(body + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, n))]
    zeros = bytes(1 << 20)
    for start in range(0, n, len(zeros)):
        out.append(packer.compress(zeros[: min(len(zeros), n - start)]))
    out.append(packer.flush())
    return b"".join(out)


def _jpeg_scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan (SOS segment and its entropy-coded data) of a JPEG."""
    scans, pos = [], 2
    while pos + 4 <= len(data) and data[pos + 1] != 0xD9:
        marker, start = data[pos + 1], pos
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            while not (data[pos] == 0xFF and data[pos + 1] not in (0x00, *range(0xD0, 0xD8))):
                pos += 1
            scans.append((start, pos))
    return scans


def progressive_jpeg(side: int = 4000, scans: int = 10_000) -> bytes:
    """A progressive gray JPEG whose last (AC refinement) scan is repeated until it has `scans` scans.

    Each copy is ~14 bytes, yet libjpeg walks every block of the image again for it.
    """
    import cv2

    data = cv2.imencode(".jpg", np.zeros((side, side), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    found = _jpeg_scans(data)
    start, end = found[-1]
    return data[:end] + data[start:end] * (scans - len(found)) + data[end:]


def png_bomb(side: int = 10_000, channels: int = 4, depth: int = 16) -> bytes:
    """A PNG of side x side zeros (16-bit RGBA by default: 800 MB decoded from ~780 kB), compressed row by row."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    ihdr = struct.pack(">IIBBBBB", side, side, depth, colour, 0, 0, 0)
    packer = zlib.compressobj(9)
    row = bytes(1 + side * channels * depth // 8)  # filter byte 0, then zeros
    idat = [packer.compress(row) for _ in range(side)] + [packer.flush()]
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


def corrupt_rle_dicom() -> bytes:
    """An RLE Lossless DICOM whose one fragment is garbage (RLE is decoded by pydicom itself)."""
    from pydicom.encaps import encapsulate

    return dicom(encapsulate([b"\x01\x00\x00\x00" + b"\xff" * 60]), 64, 64, syntax="1.2.840.10008.1.2.5")


def zero_width_window_dicom(function: str = "SIGMOID") -> bytes:
    """A 64 x 64 ramp whose window has width 0 (invalid for every VOI LUT function)."""
    ramp = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    return dicom(ramp.tobytes(), 64, 64, WindowCenter=128, WindowWidth=0, VOILUTFunction=function)


def _before_pixel_data(data: bytes, extra: bytes) -> bytes:
    pos = data.index(b"\xe0\x7f\x10\x00", 132)  # the PixelData tag of these small files
    return data[:pos] + extra + data[pos:]


def dense_elements_dicom(mb: float = 31.0) -> bytes:
    """A small image preceded by `mb` MB of empty private elements (8 bytes each)."""
    n, parts, group, elem = int(mb * 1e6) // 8, [], 0x0011, 0x1000
    for _ in range(n):
        parts.append(struct.pack("<HH2sH", group, elem, b"LO", 0))
        elem += 1
        if elem > 0xFFFF:
            group, elem = group + 2, 0x1000
    return _before_pixel_data(dicom(bytes(64), 8, 8), b"".join(parts))


def sequence_items_dicom(mb: float = 31.0) -> bytes:
    """A small image preceded by an undefined-length private sequence of `mb` MB of empty items.

    pydicom parses undefined-length sequences even when they are not asked for (~11 us and ~0.7 kB per item).
    """
    items = struct.pack("<HHI", 0xFFFE, 0xE000, 0) * (int(mb * 1e6) // 8)
    seq = struct.pack("<HH2sHI", 0x0011, 0x1000, b"SQ", 0, 0xFFFFFFFF) + items + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return _before_pixel_data(dicom(bytes(64), 8, 8), seq)


def phantom_png(height: int = 1200, width: int = 1000) -> bytes:
    """A plain 16-bit radiograph-like PNG (a smooth gradient with a bright band): the request that must still work."""
    import cv2

    y, x = np.mgrid[0:height, 0:width]
    img = (1000 + 2 * x + y).astype(np.uint16)
    img[height // 3 : height // 3 + 80] += 1500
    return cv2.imencode(".png", img)[1].tobytes()


def junk(mb: float = 31.0) -> bytes:
    """Bytes that are no image format (415)."""
    return b"not an image " + bytes(int(mb * 1e6))


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`uvicorn app.main:app` on loopback as a child process whose address space is capped at `mem_cap_mb`."""

    def __init__(self, mem_cap_mb: int, env: dict[str, str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cap = mem_cap_mb * 2**20

        def limit() -> None:  # runs in the child, before uvicorn starts
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            os.nice(19)

        self.log = open(log, "w")
        cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning", "--no-access-log"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, **env), stdout=self.log,
                                     stderr=subprocess.STDOUT, preexec_fn=limit)
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def status(self, field: str) -> float:
        """VmRSS or VmHWM of the server, in MB (0 once it is gone)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, self.status("VmRSS"))

    def wait_healthy(self, timeout_s: float = 180.0) -> dict:
        from scripts.service_harness import wait_healthy

        health = wait_healthy(self.url, self.proc, timeout_s, self.log.name)
        self._sampler.start()
        return health

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    build: Callable[[], bytes]
    query: str = ""
    repeat: int = 1
    note: str = ""


def cases() -> list[Case]:
    """Issue 16's inputs at the sizes it reports (and a normal image first and last)."""
    return [
        Case("normal 16-bit PNG", phantom_png, note="must stay 200"),
        Case("1. J2K DICOM 10000^2 x 40 frames, NumberOfFrames=1", j2k_frames_dicom),
        Case("1. J2K DICOM 10000^2 single frame", lambda: j2k_frames_dicom(frames=1)),
        Case("1. J2K frame larger than Rows x Columns", lambda: _retag(j2k_frames_dicom(frames=1), 512)),
        Case("2. deflated DICOM -> 500 MB", lambda: deflated_dicom(500)),
        Case("2. deflated DICOM -> 2 GB", lambda: deflated_dicom(2000)),
        Case("3. deflated DICOM -> 500 MB, 4 in a row", lambda: deflated_dicom(500), repeat=4),
        Case("3. 31 MB junk (415), 8 in a row", junk, repeat=8),
        Case("5. progressive JPEG, 10,000 scans", progressive_jpeg),
        Case("6. 16-bit RGBA PNG 10000^2", png_bomb),
        Case("6. 16-bit RGBA PNG 10000^2 + overlay", png_bomb, query="?overlay=true"),
        Case("8. corrupt RLE DICOM", corrupt_rle_dicom),
        Case("9. window width 0, SIGMOID", zero_width_window_dicom),
        Case("9. window width 0, LINEAR_EXACT", lambda: zero_width_window_dicom("LINEAR_EXACT")),
        Case("parse: 31 MB of tiny DICOM elements", dense_elements_dicom),
        Case("parse: 31 MB undefined-length sequence", sequence_items_dicom, repeat=3),
        Case("normal 16-bit PNG + overlay", phantom_png, query="?overlay=true", note="must stay 200"),
    ]


def _retag(data: bytes, side: int) -> bytes:
    """The same file with Rows and Columns rewritten to `side` (the frame itself stays larger)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows = ds.Columns = side
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def post(url: str, data: bytes, query: str = "", timeout_s: float = 120.0) -> tuple[int, str, float]:
    """(status, error word or "", seconds) of one upload."""
    import httpx

    t0 = time.perf_counter()
    try:
        r = httpx.post(f"{url}/detect{query}", files={"file": ("upload.bin", data, "application/octet-stream")},
                       timeout=timeout_s)
    except httpx.HTTPError as err:
        return 0, type(err).__name__, time.perf_counter() - t0
    word = r.json().get("error", "") if r.headers.get("content-type", "").startswith("application/json") else ""
    return r.status_code, word, time.perf_counter() - t0


def slow_clients(url: str, port: int, n: int = 17) -> tuple[int, str, float]:
    """`n` connections send headers and 70 bytes of body, then stall; meanwhile one normal upload is timed."""
    socks = []
    head = (b"POST /detect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000000\r\n\r\n")
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(head + b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n"[:70])
        socks.append(sock)
    time.sleep(0.5)
    try:
        return post(url, phantom_png(), timeout_s=60)
    finally:
        for sock in socks:
            sock.close()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Hostile uploads against a local Bone-R service under a memory cap.")
    p.add_argument("--mem-cap-mb", type=int, default=3072, help="the server's address-space cap (RLIMIT_AS), MB")
    p.add_argument("--weights", type=Path, default=None, help="model weights (default: the bundled model)")
    p.add_argument("--upload-timeout-s", type=float, default=10.0, help="BONER_UPLOAD_TIMEOUT_S of the started service")
    p.add_argument("--only", default=None, help="run only the cases whose name contains this")
    p.add_argument("--json", type=Path, default=None, help="write the table and summary here")
    p.add_argument("--log", type=Path, default=None, help="server log (default: a temp file)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    env = {"YOLO_OFFLINE": "1", "BONER_UPLOAD_TIMEOUT_S": str(args.upload_timeout_s), "BONER_WARMUP": "1"}
    if args.weights:
        env["BONER_WEIGHTS"] = str(args.weights.resolve())
    log = args.log or Path(tempfile.mkstemp(prefix="boner-hostile-", suffix=".log")[1])
    selected = [c for c in cases() if args.only is None or args.only in c.name]
    server = Server(args.mem_cap_mb, env, log)
    rows: list[dict] = []
    try:
        server.wait_healthy()
        post(server.url, phantom_png())  # first request: lazy imports and allocator warm-up
        baseline = server.status("VmRSS")
        print(f"server pid {server.proc.pid}, address space capped at {args.mem_cap_mb} MB, baseline RSS {baseline:.0f} MB")
        print(f"{'case':52} {'bytes':>10} {'status':>7} {'error':24} {'s':>6} {'peak MB':>8} {'after MB':>8}")

        def report(name: str, size: int, status: int, word: str, seconds: float, peak: float) -> None:
            after = server.status("VmRSS")
            rows.append({"case": name, "bytes": size, "status": status, "error": word, "seconds": round(seconds, 2),
                         "peak_rss_mb": round(peak), "rss_after_mb": round(after), "alive": server.proc.poll() is None})
            print(f"{name:52} {size:>10,} {status:>7} {word:24} {seconds:>6.2f} {peak:>8.0f} {after:>8.0f}", flush=True)

        for case in selected:
            data = case.build()
            for i in range(case.repeat):
                server.peak_mb = server.status("VmRSS")
                status, word, seconds = post(server.url, data, case.query)
                name = case.name if case.repeat == 1 else f"{case.name} [{i + 1}]"
                report(name, len(data), status, word, seconds, server.peak_mb)
            del data
        if args.only is None or "slow" in args.only:
            server.peak_mb = server.status("VmRSS")
            status, word, seconds = slow_clients(server.url, server.port)
            report("4. normal PNG while 17 clients stall mid-body", len(phantom_png()), status, word, seconds, server.peak_mb)
        time.sleep(1.0)
        summary = {"mem_cap_mb": args.mem_cap_mb, "baseline_rss_mb": round(baseline),
                   "peak_rss_mb": round(server.status("VmHWM")), "final_rss_mb": round(server.status("VmRSS")),
                   "alive": server.proc.poll() is None}
    finally:
        server.stop()
    print(f"baseline RSS {summary['baseline_rss_mb']} MB, peak RSS (VmHWM) {summary['peak_rss_mb']} MB, "
          f"RSS at the end {summary['final_rss_mb']} MB, server {'alive' if summary['alive'] else 'DEAD'}; log: {log}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "cases": rows}, indent=2) + "\n")
    bad = [r for r in rows if not (400 <= r["status"] < 500 or r["status"] == 200) or not r["alive"]]
    return 1 if bad or not summary["alive"] else 0


if __name__ == "__main__":
    sys.exit(main())
