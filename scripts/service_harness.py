"""Shared pieces of the service reliability scripts (load_test, overhead, fuzz_api).

`LocalServer` starts `uvicorn app.main:app` on 127.0.0.1 (a free port) as a child
process with `BONER_*` settings, waits for `/health`, and stops it; the scripts
talk to nothing but loopback. `radiograph_pngs` makes radiograph-sized 16-bit PNG
phantoms (synthetic: nothing read from the data folder).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# (height, width) of common CR/DX detector formats
RADIOGRAPH_SIZES = [(2140, 1760), (2500, 2048), (1760, 1760), (2048, 1536)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def radiograph_pngs(count: int = 4, seed: int = 0) -> list[bytes]:
    """`count` 16-bit PNG phantoms of real detector sizes (5 to 8 MB each)."""
    from bone_r.synthetic import encode, make_phantom

    images = []
    for i in range(count):
        height, width = RADIOGRAPH_SIZES[i % len(RADIOGRAPH_SIZES)]
        images.append(encode(make_phantom(height, width, seed=seed + i).pixels, ".png"))
    return images


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def add_server_args(parser) -> None:
    parser.add_argument("--url", default=None,
                        help="use a service already running at this loopback URL instead of starting one")
    parser.add_argument("--weights", type=Path, default=None, help="model weights (default: the bundled model)")
    parser.add_argument("--backend", default=None, help="detector backend (default: from the card or file type)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-concurrency", type=int, default=1, help="BONER_MAX_CONCURRENCY of the started service")
    parser.add_argument("--queue-limit", type=int, default=16, help="BONER_QUEUE_LIMIT of the started service")
    parser.add_argument("--log", type=Path, default=None, help="server log file (default: a temp file)")


def check_loopback(url: str) -> None:
    from urllib.parse import urlparse

    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"error: {url} is not a loopback address; these scripts only talk to 127.0.0.1")


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float, log: Path | str | None) -> dict:
    """Poll `url`/health until the model is loaded; SystemExit with the reason when the server dies, reports an
    unavailable model, or is not up within `timeout_s`."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"error: the service exited during startup (code {proc.returncode}); see {log}")
        try:
            health = httpx.get(f"{url}/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            time.sleep(0.5)
            continue
        if health.get("status") != "ok":
            raise SystemExit(f"error: the service is up but its model is unavailable: {health.get('reason')}")
        return health
    raise SystemExit(f"error: the service did not become healthy within {timeout_s:.0f} s")


class LocalServer:
    """A `uvicorn app.main:app` child process on loopback, or an existing one (`url`)."""

    def __init__(self, args, startup_timeout_s: float = 180.0):
        self.args = args
        self.url = args.url.rstrip("/") if args.url else None
        self.proc: subprocess.Popen | None = None
        self.startup_timeout_s = startup_timeout_s
        self.log_path = args.log

    def __enter__(self) -> LocalServer:
        if self.url:
            check_loopback(self.url)
            self._wait_healthy()
            return self
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, YOLO_OFFLINE="1", BONER_DEVICE=self.args.device,
                   BONER_MAX_CONCURRENCY=str(self.args.max_concurrency), BONER_QUEUE_LIMIT=str(self.args.queue_limit))
        if self.args.weights:
            env["BONER_WEIGHTS"] = str(Path(self.args.weights).resolve())
        if self.args.backend:
            env["BONER_BACKEND"] = self.args.backend
        if self.log_path is None:
            self.log_path = Path(tempfile.mkstemp(prefix="boner-server-", suffix=".log")[1])
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", "--no-access-log"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        self.health = wait_healthy(self.url, self.proc, self.startup_timeout_s, self.log_path)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def rss_mb(self) -> float | None:
        if self.pid is None:
            return None
        import psutil

        return psutil.Process(self.pid).memory_info().rss / 2**20

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self._log.close()
