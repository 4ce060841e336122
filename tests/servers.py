"""Servers the tests and benchmarks start on loopback: a Prefect server, a Dask cluster.

Each is a context manager that yields the address and stops what it started, run the way a
team runs them (``prefect server start``, ``dask scheduler`` and ``dask worker`` as separate
processes), so tests and benchmarks exercise the real client paths.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_server(home: Path):
    """`prefect server start` on loopback (Dask workers need a server to report to)."""
    port = free_port()
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false",
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("w")
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((home / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@contextlib.contextmanager
def dask_cluster(home: Path, workers: int, threads: int = 1):
    """``dask scheduler`` and ``dask worker --nworkers N --nthreads T`` as separate processes."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = (home / "dask.log").open("w")
    procs = [
        subprocess.Popen(
            [
                str(BIN / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                ":0",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ),  # fmt: skip
    ]
    try:
        deadline = time.monotonic() + 60
        while True:  # the scheduler listens
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError((home / "dask.log").read_text()[-2000:])
            time.sleep(0.2)
        procs.append(
            subprocess.Popen(
                [
                    str(BIN / "dask"),
                    "worker",
                    address,
                    "--nworkers",
                    str(workers),
                    "--nthreads",
                    str(threads),
                    "--dashboard-address",
                    ":0",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        )
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
        yield address
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()
