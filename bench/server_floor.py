"""What granian itself costs per request, as gatehouse runs it: the floor under any answer, a cache hit's included.

    .venv/bin/python bench/server_floor.py [--work 0,15,30] [--seconds 5] [--methods GET,POST]

Serves an RSGI app on granian's embedded server in a uvloop loop (exactly as ``gatehouse serve`` does) that
spins for ``work`` µs of Python and answers a fixed 40-byte JSON body, and drives it with wrk (1 thread, 16
connections, keep-alive). Prints requests/s and the server's CPU per request (from /proc), so the share of a
request that is granian's (parsing, handing the request to the event loop's thread and the answer back) can
be read off: CPU per request minus ``work``. With ``POST`` the requests carry the bench's 35-byte insert body,
which the app reads whole (``await protocol()``, as gatehouse does) before it spins: the difference to ``GET``
is what reading a small body costs through granian.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from serving import cpu_seconds

BODY = b'[{"id":1,"name":"Widget","price":10}]'
POST_SCRIPT = """wrk.method = "POST"
wrk.body = '{"user_id": 7, "status": "placed"}'
wrk.headers["Content-Type"] = "application/json"
"""


class SpinApp:
    def __init__(self, work_s: float) -> None:
        self.work_s = work_s

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if scope.method == "POST":
            await protocol()
        end = time.perf_counter() + self.work_s
        while time.perf_counter() < end:
            pass
        protocol.response_bytes(200, [("content-type", "application/json")], BODY)

    def __rsgi_init__(self, loop: Any) -> None:
        """Nothing to set up."""

    def __rsgi_del__(self, loop: Any) -> None:
        """Nothing to tear down."""


def serve(port: int, work_us: float) -> None:
    import uvloop
    from granian.server.embed import Server

    async def run() -> None:
        await Server(SpinApp(work_us / 1e6), address="127.0.0.1", port=port, log_enabled=False).serve()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


def measure(work_us: float, seconds: int, method: str) -> tuple[float, float]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--work", str(work_us)])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/products?id=eq.1"
        with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
            script.write(POST_SCRIPT if method == "POST" else "")
            script.flush()
            wrk = ["wrk", "-t1", "-c16", "-s", script.name]
            subprocess.run([*wrk, "-d1s", url], capture_output=True, check=True)
            before = cpu_seconds(server.pid)
            text = subprocess.run([*wrk, f"-d{seconds}s", url], capture_output=True, text=True, check=True).stdout
        used = cpu_seconds(server.pid) - before
        rps = float(next(line.split()[1] for line in text.splitlines() if line.startswith("Requests/sec")))
        return rps, used / (rps * seconds) * 1e6
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="0,15,30", help="µs of Python per request, comma-separated")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--methods", default="GET", help="GET (no body), POST (a small body, read whole), or both")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve is not None:
        serve(options.serve, float(options.work))
        return
    print("| method | Python work per request (µs) | req/s | server CPU per request (µs) | of which granian's (µs) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for work in (float(w) for w in options.work.split(",")):
        for method in options.methods.split(","):
            rps, cpu = measure(work, options.seconds, method)
            print(f"| {method} | {work:g} | {rps:,.0f} | {cpu:.1f} | {cpu - work:.1f} |", flush=True)


if __name__ == "__main__":
    main()
