"""A Prefect server on loopback for one session: the tests and the Prefect-vs-DVC benchmark start theirs here."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_server(home: Path, timeout: float = 120.0) -> Iterator[dict[str, str]]:
    """Start `prefect server start` on a free loopback port with its database under `home`.

    Yields the environment a client process needs (PREFECT_API_URL, PREFECT_HOME, local result
    storage under `home`, analytics off); the server is stopped on exit.
    """
    port = _free_port()
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the Prefect server did not start within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=60)
