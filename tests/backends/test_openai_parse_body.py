"""``backends.openai_compat.parse_body``: the fast path for large base64 bodies gives exactly what
``orjson.loads`` gives — same value, same errors — for every shape, usual or not."""

from __future__ import annotations

import base64
import os

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.openai_compat import _SPLICE_MIN, parse_body

B64 = base64.b64encode(os.urandom(60_000)).decode()  # above the size where the fast path starts


def same(raw: bytes) -> None:
    try:
        expected = orjson.loads(raw)
    except orjson.JSONDecodeError:
        with pytest.raises(orjson.JSONDecodeError):
            parse_body(raw)
        return
    assert parse_body(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        orjson.dumps({"created": 1, "data": [{"b64_json": B64}]}),
        orjson.dumps(
            {
                "created": 1,
                "data": [
                    {"b64_json": B64, "revised_prompt": 'said "b64_json": "x"'},
                    {"b64_json": B64[:100]},
                    {"url": "http://x/y.png"},
                ],
                "output_format": "png",
                "usage": {"total_tokens": 5},
            }
        ),
        b'{ "data" :\n [ { "b64_json" :\t"' + B64.encode() + b'" , "n": 1 } ] , "created": 2 }',
        orjson.dumps({"data": [{"b64_json": B64}], "meta": {"b64_json": "elsewhere"}}),  # key outside data
        orjson.dumps({"data": [{"b64_json": B64, "extra": {"b64_json": "nested"}}]}),  # nested key
        b'{"data": [{"b64_json": "' + B64[:10].encode() + b'", "b64_json": "' + B64.encode() + b'"}]}',  # dup key
        b'{"data": [{"b64_json": "' + B64.encode() + b'\\/x"}]}',  # escape inside
        b'{"data": [{"b64_json": "' + B64.encode() + 'é"}]}'.encode(),  # non-ASCII inside
        orjson.dumps({"note": "b64_json", "data": [{"b64_json": B64}]}),  # the key as a value
        orjson.dumps({"data": [{"b64_json": None, "url": "u"}], "pad": B64}),  # non-string value
        orjson.dumps({"data": [{"b64_json": ""}, {"b64_json": B64}]}),  # empty string
        orjson.dumps({"data": "not a list", "b64_json": B64}),
        orjson.dumps([{"b64_json": B64}]),  # not an object
        orjson.dumps({"data": [{"b64_json": B64}]})[:-3],  # truncated
        orjson.dumps({"data": [{"b64_json": B64}]})[:30000],  # truncated in the string
        b'{"data": [{"b64_json": "' + B64.encode() + b'"}]} trailing',
        b'{"data": [{"b64_json": "' + B64.encode() + b'"',
    ],
)
def test_same_as_orjson(raw: bytes) -> None:
    assert len(raw) >= _SPLICE_MIN or raw.startswith(b"[")
    same(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["b64_json", "url", "x"]), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(
        st.dictionaries(
            st.sampled_from(["b64_json", "url", "revised_prompt", "x"]), json_values | st.just(B64), max_size=4
        ),
        max_size=4,
    ),
    extra=st.dictionaries(st.sampled_from(["created", "b64_json", "meta"]), json_values, max_size=3),
    cut=st.none() | st.integers(0, 200_000),
)
def test_same_as_orjson_for_generated_bodies(items: list, extra: dict, cut: int | None) -> None:
    raw = orjson.dumps({**extra, "data": items, "pad": B64})
    same(raw if cut is None else raw[:cut])
