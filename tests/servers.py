"""Run test servers on 127.0.0.1 with free ports; they stop when the context exits.

``serve_app(app)`` runs any ASGI app (a fake upstream, or the gateway itself) under uvicorn in a
background thread, so both sync clients (the official SDKs) and async tests can talk to it.
``run_process`` starts a third-party server process and waits until a readiness URL answers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(
    app, *, port: int | None = None, lifespan: str = "auto", timeout: float = 30.0, **uvicorn_options
) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 in a thread; yields the base URL ``http://127.0.0.1:PORT``
    (``https://`` when ``ssl_certfile`` is among the extra uvicorn options).

    An imagegate gateway runs as ``imagegate serve`` runs it: ``gateway.server.uvicorn_settings`` (the
    production protocol, read deadlines, limits); any other app (the fakes of third-party servers) runs
    under stock uvicorn."""
    from gateway.app import Gateway

    port = port or free_port()
    options: dict = {"log_level": "warning", "access_log": False}
    if isinstance(app, Gateway):
        from gateway.server import uvicorn_settings

        options.update(uvicorn_settings(app.config))
    options.update(host="127.0.0.1", port=port, lifespan=lifespan, timeout_graceful_shutdown=1)
    options.update(uvicorn_options)
    config = uvicorn.Config(app, **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("test server failed to start")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError("test server did not start in time")
        time.sleep(0.01)
    try:
        yield f"{'https' if uvicorn_options.get('ssl_certfile') else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def run_process(
    argv: Sequence[str],
    *,
    ready_url: str,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float = 60.0,
    ready_status: int = 200,
) -> Iterator[subprocess.Popen]:
    """Start a server process, wait until ``ready_url`` answers ``ready_status``, stop it afterwards
    (SIGTERM to its process group, then SIGKILL)."""
    quiet = os.environ.get("IMAGEGATE_TEST_SERVER_LOGS") is None
    proc = subprocess.Popen(
        list(argv),
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=subprocess.STDOUT if quiet else None,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited with {proc.returncode} before it was ready")
            try:
                if httpx.get(ready_url, timeout=1.0).status_code == ready_status:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{argv[0]} not ready at {ready_url} after {timeout}s")
            time.sleep(0.2)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


T = TypeVar("T")


def with_env(build: Callable[[], T], env: Mapping[str, str]) -> T:
    """``build()`` with ``env`` set for its duration: a config's ``${VAR}`` secrets resolve when it is parsed,
    so test keys never leak into the rest of the session's environment."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        return build()


@contextlib.contextmanager
def serve_gateway(config, backends=None, *, ready_timeout: float = 60.0) -> Iterator[str]:
    """Serve an imagegate gateway built from ``config`` and wait until ``/readyz`` says ready."""
    from gateway.app import create_app

    with serve_app(create_app(config, backends)) as base:
        deadline = time.monotonic() + ready_timeout
        while httpx.get(base + "/readyz", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not ready after {ready_timeout}s: {httpx.get(base + '/readyz').text}")
            time.sleep(0.05)
        yield base


def post_generation(base: str, body: dict | bytes, *, timeout: float = 30.0, **kwargs) -> httpx.Response:
    """``POST {base}/v1/images/generations`` with a JSON body (or raw bytes), as a client would."""
    if isinstance(body, (bytes, bytearray)):
        return httpx.post(base + "/v1/images/generations", content=body, timeout=timeout, **kwargs)
    return httpx.post(base + "/v1/images/generations", json=body, timeout=timeout, **kwargs)
