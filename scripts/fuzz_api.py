"""Bounded schemathesis run against the service's OpenAPI schema, on loopback.

Starts the service (or uses `--url` on 127.0.0.1), runs `schemathesis run` on
`/openapi.json` with a fixed seed and a per-operation example budget, then checks
that the service is still alive and healthy. Every check runs except
`positive_data_acceptance`: random bytes fit the schema's "binary" `file` yet are
no image, and the right answer to them is a 4xx.

    .venv/bin/python scripts/fuzz_api.py --weights weights/bone-r-default.pt --max-examples 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scripts.service_harness import LocalServer, add_server_args

ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Bounded schemathesis run against /openapi.json on loopback.")
    add_server_args(p)
    p.add_argument("--max-examples", type=int, default=100, help="examples per operation and phase")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--max-time", type=int, default=None, help="time budget in seconds for the whole run")
    p.add_argument("--report-dir", type=Path, default=ROOT / "artifacts" / "fuzz_api", help="junit + json reports")
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if exe is None:
        print("error: schemathesis is not installed (pip install -r requirements.txt)", file=sys.stderr)
        return 2
    args.report_dir.mkdir(parents=True, exist_ok=True)
    with LocalServer(args) as server:
        cmd = [exe, "run", f"{server.url}/openapi.json", "--checks", "all", "--exclude-checks", "positive_data_acceptance",
               "--max-examples", str(args.max_examples), "--seed", str(args.seed), "--workers", "1",
               "--request-timeout", str(args.request_timeout), "--suppress-health-check", "all",
               "--report", "junit", "--report-junit-path", str(args.report_dir / "junit.xml")]
        if args.max_time:
            cmd += ["--max-time", str(args.max_time)]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT)
        wall = time.perf_counter() - t0
        import httpx

        health = httpx.get(f"{server.url}/health", timeout=10).json()
        alive = server.alive() and health.get("status") == "ok"
        model = {"backend": health.get("backend"), "detector": health.get("detector"), "weights": health.get("weights")}
    summary = {"model": model, "max_examples": args.max_examples, "seed": args.seed, "schemathesis_exit": proc.returncode,
               "wall_s": round(wall, 1), "server_alive_and_healthy_after": alive,
               "junit": str(args.report_dir / "junit.xml"), "pass": proc.returncode == 0 and alive}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"schemathesis exit {proc.returncode} in {wall:.0f} s; service {'healthy' if alive else 'NOT healthy'} after -> "
          f"{'PASS' if summary['pass'] else 'FAIL'}")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
