"""Request parsing and validation (pure) — every bad input is a 4xx with a message that names the field."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.base import Image
from backends.errors import CallerError, InvalidRequest
from gateway import api


def parse(body, headers=None):
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return api.parse_generation(raw, headers or {}, default_size="1024x1024", request_id="r", deadline=None)


def test_minimal_request_gets_openai_defaults():
    r = parse({"prompt": "a red fox"})
    assert (r.prompt, r.n, r.width, r.height, r.response_format, r.output_format) == (
        "a red fox",
        1,
        1024,
        1024,
        "b64_json",
        "png",
    )
    assert r.max_cost_usd is None


def test_full_request_with_extensions():
    r = parse(
        {
            "prompt": "x",
            "model": "sdxl",
            "n": 2,
            "size": "768x512",
            "quality": "hd",
            "response_format": "url",
            "output_format": "jpg",
            "output_compression": 40,
            "user": "u1",
            "tier": "preview",
            "seed": 7,
            "steps": 12,
            "guidance_scale": 4.5,
            "negative_prompt": "blurry",
            "max_cost_usd": 0.05,
            "style": "vivid",
            "background": "auto",
        }
    )
    assert (r.width, r.height, r.n, r.output_format, r.output_compression) == (768, 512, 2, "jpeg", 40)
    assert (r.tier, r.seed, r.steps, r.guidance_scale, r.negative_prompt) == ("preview", 7, 12, 4.5, "blurry")
    assert r.max_cost_usd == 0.05


def test_extension_fields_from_headers_body_wins():
    headers = {
        "x-imagegate-tier": "preview",
        "x-imagegate-seed": "42",
        "x-imagegate-steps": "8",
        "x-imagegate-max-cost-usd": "0.01",
        "x-imagegate-negative-prompt": "text",
    }
    r = parse({"prompt": "x", "steps": 20}, headers)
    assert (r.tier, r.seed, r.steps, r.negative_prompt) == ("preview", 42, 20, "text")
    assert r.max_cost_usd == 0.01


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        ({}, "prompt", "required"),
        ({"prompt": "   "}, "prompt", "must not be empty"),
        ({"prompt": 5}, "prompt", "must be a string"),
        ({"prompt": "x" * 40_000}, "prompt", "longer than"),
        ({"prompt": "x", "n": 0}, "n", "between 1 and 10"),
        ({"prompt": "x", "n": 11}, "n", "between 1 and 10"),
        ({"prompt": "x", "n": "two"}, "n", "integer"),
        ({"prompt": "x", "n": True}, "n", "integer"),
        ({"prompt": "x", "size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"prompt": "x", "size": "0x512"}, "size", "between 1 and 4096"),
        ({"prompt": "x", "size": "8192x8192"}, "size", "between 1 and 4096"),
        ({"prompt": "x", "size": 1024}, "size", "must be a string"),
        ({"prompt": "x", "response_format": "gif"}, "response_format", "url, b64_json"),
        ({"prompt": "x", "output_format": "bmp"}, "output_format", "png, jpeg, webp"),
        ({"prompt": "x", "output_compression": 101}, "output_compression", "between 0 and 100"),
        ({"prompt": "x", "quality": "ultra"}, "quality", "must be one of"),
        ({"prompt": "x", "seed": -1}, "seed", "between"),
        ({"prompt": "x", "steps": 0}, "steps", "between 1 and 500"),
        ({"prompt": "x", "guidance_scale": "lots"}, "guidance_scale", "number"),
        ({"prompt": "x", "max_cost_usd": -1}, "max_cost_usd", "between"),
        ({"prompt": "x", "stream": True}, "stream", "not supported"),
        ({"prompt": "x", "promt": "typo"}, "promt", "unknown parameter"),
    ],
)
def test_bad_inputs_are_caller_errors_naming_the_param(body, param, fragment):
    with pytest.raises(InvalidRequest) as err:
        parse(body)
    assert err.value.status == 400 and err.value.param == param
    assert fragment in err.value.message


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.dictionaries(
            st.sampled_from(
                [
                    "prompt",
                    "n",
                    "size",
                    "seed",
                    "steps",
                    "quality",
                    "output_format",
                    "guidance_scale",
                    "response_format",
                    "model",
                    "tier",
                    "x",
                ]
            ),
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(-(2**63), 2**63 - 1),
                st.floats(allow_nan=False),
                st.text(max_size=20),
                st.lists(st.integers(-5, 5), max_size=3),
            ),
            max_size=8,
        ).map(orjson.dumps),
    )
)
def test_no_input_of_any_shape_escapes_the_error_vocabulary(raw):
    try:
        parse(raw)
    except CallerError as exc:
        assert 400 <= exc.status < 500
        assert orjson.loads(api.render_error(exc))["error"]["message"]


def test_render_passes_base64_text_through():
    img = Image(format="png", b64="iVBORw0KGgo=")
    body = orjson.loads(api.render_images([img], "b64_json", lambda i: "", created=5))
    assert body == {"created": 5, "data": [{"b64_json": "iVBORw0KGgo="}]}
    body = orjson.loads(
        api.render_images([Image(data=b"\x89PNG", revised_prompt="r")], "url", lambda i: "http://h/x.png", created=5)
    )
    assert body["data"] == [{"url": "http://h/x.png", "revised_prompt": "r"}]


# -- strict numbers and booleans (issue 8, items 3 and 18) -------------------------------------------------

HEADER_NUMBERS_REFUSED = ["--5", "²", "٣", "４", "1_0", "0x10", "5e", "", " ", "\xa07", "7\xa0", "+-7", "9" * 5000]


@pytest.mark.parametrize("text", [*HEADER_NUMBERS_REFUSED, "7.0", "1e3", "nan", "inf"])
def test_integer_headers_accept_only_ascii_digits(text):
    with pytest.raises(InvalidRequest) as err:
        parse({"prompt": "x"}, {"x-imagegate-seed": text})
    assert err.value.param == "seed" and err.value.status == 400


@pytest.mark.parametrize(
    "text", [*HEADER_NUMBERS_REFUSED, "nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400", "1" * 400, "4,5"]
)
def test_number_headers_accept_only_ascii_decimal_text(text):
    with pytest.raises(InvalidRequest) as err:
        parse({"prompt": "x"}, {"x-imagegate-guidance-scale": text})
    assert err.value.param == "guidance_scale"


@pytest.mark.parametrize(
    ("text", "seed"), [("7", 7), (" 7\t", 7), ("+7", 7), ("0", 0), ("9223372036854775807", 2**63 - 1)]
)
def test_integer_headers_in_strict_form_are_read(text, seed):
    assert parse({"prompt": "x"}, {"x-imagegate-seed": text}).seed == seed


@pytest.mark.parametrize(("text", "value"), [("4.5", 4.5), (".5", 0.5), ("5.", 5.0), ("1e1", 10.0), ("-0", 0.0)])
def test_number_headers_in_strict_form_are_read(text, value):
    assert parse({"prompt": "x"}, {"x-imagegate-guidance-scale": text}).guidance_scale == value


@pytest.mark.parametrize(
    "body",
    [
        {"seed": "--5"},
        {"seed": "²"},
        {"steps": "٣"},
        {"seed": "42"},
        {"n": "2"},
        {"n": 2.0},
        {"steps": 1e300},
        {"guidance_scale": "4.5"},
        {"max_cost_usd": "1"},
        {"output_compression": "50"},
        {"n": False},
    ],
)
def test_body_numbers_must_be_json_numbers(body):
    """Text is read as a number only from headers; in JSON a number is a JSON number (as in OpenAI's API)."""
    with pytest.raises(InvalidRequest) as err:
        parse({"prompt": "x", **body})
    assert err.value.param == next(iter(body))


@pytest.mark.parametrize("value", [{}, [], "", 0, 1, "false", "true", "no", 0.0])
def test_stream_must_be_a_json_boolean(value):
    with pytest.raises(InvalidRequest) as err:
        parse({"prompt": "x", "stream": value})
    assert err.value.param == "stream" and "true or false" in err.value.message


def test_stream_false_and_null_are_accepted_true_is_refused_clearly():
    assert parse({"prompt": "x", "stream": False}).prompt == "x"
    assert parse({"prompt": "x", "stream": None}).prompt == "x"  # null: not set, like every field
    with pytest.raises(InvalidRequest, match="not supported"):
        parse({"prompt": "x", "stream": True})


def test_boolean_header_text_is_exactly_true_or_false():
    assert api.flag(api.HeaderText("true"), "f") is True and api.flag(api.HeaderText(" false "), "f") is False
    for text in ("True", "1", "yes", "", "on", "false!"):
        with pytest.raises(InvalidRequest):
            api.flag(api.HeaderText(text), "f")
    with pytest.raises(InvalidRequest):
        api.flag("true", "f")  # JSON text is not a JSON boolean


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(max_size=30),
        st.from_regex(r"\A[ \t]?[+-]{0,2}[0-9²³¹٣４]{0,25}(\.[0-9]{0,5})?([eE][+-]?[0-9]{1,5})?[ \t]?\Z"),
    ),
    st.sampled_from(sorted(api.HEADER_FIELDS)),
)
def test_any_header_text_is_a_value_or_a_caller_error(text, header):
    try:
        parse({"prompt": "x"}, {header: text})
    except CallerError as exc:
        assert exc.status == 400 and exc.param == api.HEADER_FIELDS[header]
