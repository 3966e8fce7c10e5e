"""No input of any shape yields a 5xx or a traceback: arbitrary bodies and headers (every ``X-Imagegate-*``
header, unicode digits, signs, whitespace, huge and non-finite numbers, raw latin-1 bytes) against the ASGI
app, and the same over a raw socket to the production server with chunked bodies cut at random places.

The backend is a healthy stub, so every answer must be a 2xx or a caller error (4xx)."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Iterator, MutableMapping
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from backends.http import make_client
from backends.remote import RemoteBackend
from gateway import api
from gateway.app import create_app
from gateway.config import load_config_text
from tests.fakes.openai_stub import OpenAIStub
from tests.servers import serve_app, serve_gateway

CONFIG = """
server: {max_body_bytes: 2048}
backends:
  stub: {type: openai, cost: {per_image: 0.01}, settings: {base_url: "BASE"}}
tiers: {standard: {}, preview: {}}
routes:
  - {name: main, candidates: [{backend: stub}]}
default_tier: standard
"""

# Text that looks like a number to someone: unicode digits ("²" is str.isdigit(), "٣" is read by int()),
# doubled signs, separators, whitespace int()/float() would forgive, non-finite and overflowing values.
SPECIAL = [
    "--5",
    "-+5",
    "²",
    "³",
    "¹",
    "٣",
    "４",
    "1_0",
    "0x10",
    " 7 ",
    "\t7",
    "+7",
    "-0",
    "7.",
    ".5",
    "5e",
    "1e400",
    "-1e400",
    "1e-400",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "Infinity",
    "9" * 5000,
    "1" * 400 + "e1",
    "\xa07",
    "7\xa0",
    "\x857",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551616",
    "1e308",
    "4,5",
]
numberish = st.one_of(
    st.sampled_from(SPECIAL),
    st.from_regex(r"\A[ \t]{0,2}[+-]{0,2}[0-9²³¹٣４]{0,25}(\.[0-9]{0,5})?([eE][+-]?[0-9]{1,5})?[ \t]{0,2}\Z"),
    st.integers().map(str),
    st.floats().map(str),
)


def _wire(text: str) -> bytes:
    """Header text as a client puts it on the wire: latin-1 where it fits (so "²" is the single byte 0xB2),
    else UTF-8 (which the gateway then reads as latin-1 mojibake)."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode()


# Header value bytes: no CR, LF or NUL (no server passes those on), anything else from 0x01 to 0xFF.
raw_value = st.binary(max_size=40).map(lambda b: b.translate(None, b"\r\n\x00"))
header_value = st.one_of(numberish.map(_wire), st.text(max_size=40).map(_wire), raw_value)
header_names = [*sorted(api.HEADER_FIELDS), "x-request-id", "content-type"]
headers = st.dictionaries(st.sampled_from([*header_names, "content-length"]), header_value, max_size=5)

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=30),
        numberish,
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)),
    max_leaves=10,
)
fields = st.sampled_from(
    [
        "prompt",
        "n",
        "size",
        "model",
        "tier",
        "seed",
        "steps",
        "quality",
        "response_format",
        "output_format",
        "output_compression",
        "guidance_scale",
        "max_cost_usd",
        "stream",
        "negative_prompt",
        "user",
    ]
)
bodies = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(fields, json_values, max_size=6).map(orjson.dumps),
    st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=20)},
        optional={
            "n": st.integers(-3, 30),
            "size": st.text(max_size=12),
            "seed": st.one_of(st.integers(-(2**63), 2**64 - 1), numberish),
            "stream": st.one_of(st.booleans(), st.sampled_from([0, 1, "", [], {}])),
            "tier": st.sampled_from(["standard", "preview", "gold"]),
        },
    ).map(orjson.dumps),
    # JSON number literals orjson.dumps cannot write: past 64 bits, past a double's range, odd exponents.
    st.tuples(
        st.sampled_from(["n", "seed", "steps", "output_compression", "guidance_scale", "max_cost_usd"]),
        st.from_regex(r"\A-?(0|[1-9][0-9]{0,40})(\.[0-9]{1,5})?([eE][+-]?[0-9]{1,4})?\Z"),
    ).map(lambda kv: b'{"prompt": "a fox", "%s": %s}' % (kv[0].encode(), kv[1].encode())),
)


def check_answer(status: int, content: bytes, header_names: set[str]) -> None:
    assert 200 <= status < 500, (status, content[:300])
    payload = orjson.loads(content)
    if status == 200:
        assert payload["data"]
    else:
        assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["message"]
        assert "Traceback" not in payload["error"]["message"]
    assert "server-timing" in header_names and "x-gateway-overhead-ms" in header_names


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, extra=headers)
def test_arbitrary_requests_get_a_well_formed_answer(body, extra):
    cfg = load_config_text(CONFIG.replace("BASE", "http://stub.invalid/v1"), "fuzz")
    stub = OpenAIStub()
    app = create_app(cfg)

    async def run() -> httpx.Response:
        # In place of start(): the backend's client talks to the in-process stub app, not the network.
        backend = app.backends["stub"]
        assert isinstance(backend, RemoteBackend)
        backend._client = client = make_client(backend.spec, transport=httpx.ASGITransport(stub))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as gw:
            try:
                return await gw.post("/v1/images/generations", content=body, headers=extra)
            finally:
                await client.aclose()

    resp = asyncio.run(run())
    check_answer(resp.status_code, resp.content, set(resp.headers))


# -- over a raw socket, to the server `imagegate serve` runs --------------------------------------------------


@pytest.fixture(scope="module")
def gateway_port() -> Iterator[int]:
    with serve_app(OpenAIStub()) as upstream:
        config = load_config_text(CONFIG.replace("BASE", upstream + "/v1"), "fuzz-socket")
        with serve_gateway(config) as base:
            yield int(base.rsplit(":", 1)[1])


def read_answer(sock: socket.socket) -> tuple[int, dict[str, bytes], bytes]:
    """One HTTP/1.1 answer with a Content-Length (the gateway always sends one): status, headers, body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    raw_head, _, content = data.partition(b"\r\n\r\n")
    lines = raw_head.split(b"\r\n")
    found = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        found[name.strip().lower().decode("latin-1")] = value.strip()
    while len(content) < int(found["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of an answer"
        content += chunk
    return int(lines[0].split()[1]), found, content


def exchange(port: int, head: bytes, pieces: list[bytes]) -> tuple[int, dict[str, bytes], bytes]:
    """Send ``head`` then each piece in its own write, and read the answer. The connection is kept alive,
    as clients do: an answer given before the whole body was read (a 413, a 415) leaves the server to
    discard the rest, where closing would reset the connection under the client's remaining writes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head)
        for piece in pieces:
            sock.sendall(piece)
        return read_answer(sock)


def chunked(body: bytes, cuts: list[int]) -> list[bytes]:
    """``body`` in Transfer-Encoding: chunked, cut at ``cuts``; each chunk one write (the terminator too)."""
    bounds = sorted({0, len(body), *(c for c in cuts if 0 < c < len(body))})
    return [b"%x\r\n%s\r\n" % (b - a, body[a:b]) for a, b in itertools.pairwise(bounds)] + [b"0\r\n\r\n"]


# On the wire, header values with control characters never reach the app: the parser answers 400 and
# closes (while the client may still be sending: a reset, no answer to read). Everything else, including
# every byte from 0x80 to 0xFF (obs-text, read as latin-1), reaches the gateway.
_CONTROL = bytes(range(0x20)).replace(b"\t", b"") + b"\x7f"
raw_headers = st.lists(
    st.tuples(st.sampled_from(header_names), header_value.map(lambda v: v.translate(None, _CONTROL))), max_size=4
)


_PROMPT = b'{"prompt": "a fox"}'


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=bodies,
    cuts=st.lists(st.integers(0, 400), max_size=6),
    framing=st.sampled_from(["chunked", "length"]),
    extra=raw_headers,
)
# The classes the hostile pass found (each a 500 before): raw latin-1 digits in headers, doubled signs, and
# the same in the body.
@example(body=_PROMPT, cuts=[], framing="length", extra=[("x-imagegate-seed", b"\xb2")])
@example(body=_PROMPT, cuts=[3], framing="chunked", extra=[("x-imagegate-steps", b"\xb3")])
@example(body=_PROMPT, cuts=[], framing="length", extra=[("x-imagegate-seed", b"--5")])
@example(body=_PROMPT, cuts=[], framing="length", extra=[("x-imagegate-guidance-scale", b"1e400")])
@example(body=b'{"prompt": "a fox", "steps": "--5"}', cuts=[5, 9], framing="chunked", extra=[])
@example(body=b'{"prompt": "a fox", "n": "\xc2\xb2"}', cuts=[], framing="length", extra=[])
def test_raw_requests_over_a_socket_get_a_well_formed_answer(gateway_port, body, cuts, framing, extra):
    head = [b"POST /v1/images/generations HTTP/1.1", b"Host: 127.0.0.1"]
    head += [name.encode() + b": " + value.strip(b" \t") for name, value in extra]
    if framing == "chunked":
        head.append(b"Transfer-Encoding: chunked")
        pieces = chunked(body, cuts)
    else:
        head.append(b"Content-Length: %d" % len(body))
        bounds = sorted({0, len(body), *(c for c in cuts if 0 < c < len(body))})
        pieces = [body[a:b] for a, b in itertools.pairwise(bounds)]
    status, answer_headers, content = exchange(gateway_port, b"\r\n".join(head) + b"\r\n\r\n", pieces)
    check_answer(status, content, set(answer_headers))


def test_a_chunked_body_over_the_limit_is_refused_even_when_it_arrives_whole(gateway_port):
    """A chunked body has no Content-Length to check up front, and when it is all there before the handler
    first asks, the server hands it over in one message: the cap must still apply (issue 8, item 4)."""
    body = orjson.dumps({"prompt": "a fox " * 500})  # 3000 bytes; the limit is 2048
    head = (
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    status, _, content = exchange(gateway_port, head + b"".join(chunked(body, [])), [])
    assert status == 413 and orjson.loads(content)["error"]["code"] == "payload_too_large"
    # Cut into small chunks, sent one by one: refused as well.
    status, _, _ = exchange(gateway_port, head, chunked(body, list(range(100, 3000, 100))))
    assert status == 413


def test_a_body_over_the_limit_in_one_asgi_message_is_refused():
    """The handler itself, whatever the server: one ``http.request`` message with the whole oversized body
    and no Content-Length (chunked framing) is a 413."""
    cfg = load_config_text(CONFIG.replace("BASE", "http://stub.invalid/v1"), "fuzz")
    app = create_app(cfg)
    body = orjson.dumps({"prompt": "a fox " * 500})
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async def run() -> None:
        backend = app.backends["stub"]  # a healthy backend: before the fix, the request is simply served
        assert isinstance(backend, RemoteBackend)
        backend._client = client = make_client(backend.spec, transport=httpx.ASGITransport(OpenAIStub()))
        try:
            await app.generations(scope, receive, send)
        finally:
            await client.aclose()

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/images/generations",
        "scheme": "http",
        "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(run())
    assert sent[0]["status"] == 413
