"""Running the app in-process, for tests and benchmarks (as `fastapi.testclient` or
`transformers.testing_utils`): not part of serving. It lives in the package, not under tests/,
because both the test suite and benchmarks/bench_serving.py need it, and this is the one place
both import without path tricks."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from fastapi import FastAPI


@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Run `app` with uvicorn on a free port of `host` in a thread; yields its base URL and shuts
    it down on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))  # bound before the thread starts, so the port cannot be taken meanwhile
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="medplib-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
