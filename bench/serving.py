"""What the bench scripts share: a free port, a `gatehouse serve` started and ready, a process's CPU time."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GATEHOUSE = str(REPO / ".venv" / "bin" / "gatehouse")
READY_WITHIN_S = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def serve(project: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int, int]:
    """``gatehouse serve`` of ``project`` on free ports, once its ``/ready`` answers 200: (process, port, admin
    port). Exits the script when it does not get there within a minute."""
    port, admin = free_port(), free_port()
    server = subprocess.Popen([GATEHOUSE, "--project", str(project), "serve", "--port", str(port), "--admin-port",
                               str(admin), "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + READY_WITHIN_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as answer:
                if answer.status == 200:
                    return server, port, admin
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("gatehouse did not become ready")


def cpu_seconds(pid: int) -> float:
    """User and system CPU the process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
