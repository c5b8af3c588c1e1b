"""Bounded load test of the `/detect` service on loopback.

Starts the service (or uses `--url` on 127.0.0.1), sends `--warmup` requests, then
`--requests` requests with `--concurrency` clients, using radiograph-sized 16-bit
PNG phantoms. Reports p50/p95 latency, throughput, errors, and the server's RSS
after warm-up and after the load. Exit 0 when there were no errors and RSS grew
by at most `--max-rss-growth`.

    .venv/bin/python scripts/load_test.py --weights weights/bone-r-default.pt
    .venv/bin/python scripts/load_test.py --weights /tmp/yolov8n-untrained.pt --requests 300 --concurrency 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bone_r.modes import MODES
from scripts.service_harness import RADIOGRAPH_SIZES, LocalServer, add_server_args, percentile, radiograph_pngs


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Bounded loopback load test of POST /detect.")
    add_server_args(p)
    p.add_argument("--requests", type=int, default=300, help="measured requests")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    p.add_argument("--warmup", type=int, default=16, help="requests before the RSS baseline")
    p.add_argument("--images", type=int, default=4, help="distinct radiograph-sized PNGs")
    p.add_argument("--mode", default="balanced", choices=MODES)
    p.add_argument("--timeout-s", type=float, default=300.0, help="per-request client timeout")
    p.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed RSS growth after warm-up (fraction)")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    return p


def run_requests(url: str, images: list[bytes], n: int, concurrency: int, mode: str, timeout_s: float, desc: str):
    import httpx
    from tqdm import tqdm

    clients = {}

    def one(i: int) -> tuple[int, float, str]:
        import threading

        client = clients.setdefault(threading.get_ident(), httpx.Client(timeout=timeout_s))
        data = images[i % len(images)]
        t0 = time.perf_counter()
        try:
            r = client.post(f"{url}/detect", params={"mode": mode}, files={"file": (f"img{i % len(images)}.png", data, "image/png")})
            status, note = r.status_code, "" if r.status_code == 200 else r.text[:200]
        except httpx.HTTPError as err:
            status, note = -1, type(err).__name__
        return status, (time.perf_counter() - t0) * 1e3, note

    results = []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for result in tqdm(pool.map(one, range(n)), total=n, desc=desc, unit="req"):
            results.append(result)
    wall = time.perf_counter() - t0
    for client in clients.values():
        client.close()
    return results, wall


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        print("error: --requests and --concurrency must be >= 1", file=sys.stderr)
        return 2
    images = radiograph_pngs(args.images)
    with LocalServer(args) as server:
        rss_start = server.rss_mb()
        run_requests(server.url, images, args.warmup, args.concurrency, args.mode, args.timeout_s, "warm-up")
        rss_before = server.rss_mb()
        results, wall = run_requests(server.url, images, args.requests, args.concurrency, args.mode, args.timeout_s, "load")
        rss_after = server.rss_mb()
        health = server.health
        alive = server.alive()
    latencies = [ms for status, ms, _ in results if status == 200]
    statuses = Counter(status for status, _, _ in results)
    errors = sum(n for status, n in statuses.items() if status != 200)
    growth = (rss_after / rss_before - 1) if rss_before and rss_after else None
    report = {
        "model": {"backend": health.get("backend"), "detector": health.get("detector"), "weights": health.get("weights")},
        "requests": args.requests, "concurrency": args.concurrency, "warmup": args.warmup, "mode": args.mode,
        "image_sizes_hw": [list(RADIOGRAPH_SIZES[i % len(RADIOGRAPH_SIZES)]) for i in range(args.images)],
        "image_mb": [round(len(b) / 1e6, 2) for b in images],
        "p50_ms": round(percentile(latencies, 50), 1), "p95_ms": round(percentile(latencies, 95), 1),
        "max_ms": round(max(latencies), 1) if latencies else None,
        "throughput_rps": round(len(results) / wall, 3), "wall_s": round(wall, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())}, "errors": errors,
        "first_errors": [note for status, _, note in results if status != 200][:3],
        "rss_mb": {"start": rss_start and round(rss_start, 1), "after_warmup": rss_before and round(rss_before, 1),
                   "after_load": rss_after and round(rss_after, 1)},
        "rss_growth": None if growth is None else round(growth, 4),
        "server_alive": alive,
    }
    ok = errors == 0 and alive and (growth is None or growth <= args.max_rss_growth)
    report["pass"] = ok
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    growth_text = "n/a (external server)" if growth is None else f"{growth:+.1%}"
    print(f"{len(results)} requests, concurrency {args.concurrency}: p50 {report['p50_ms']} ms, p95 {report['p95_ms']} ms, "
          f"{report['throughput_rps']} req/s, {errors} errors, RSS {growth_text} after warm-up -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
