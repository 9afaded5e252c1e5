"""Byte-preserving JSON body edits (``JsonBody``).

Everything the gateway does not own must reach the provider byte for byte: whitespace,
escapes, key order and number spellings. Only removed / replaced members change.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from plano_extproc.body import JsonBody
from plano_extproc.errors import GatewayError


def edit(raw: str | bytes, **kw: Any) -> str:
    data = raw.encode() if isinstance(raw, str) else raw
    return JsonBody.parse(data).edited(**kw).decode("utf-8")


# --------------------------------------------------------------------------- parsing


def test_parse_exposes_values() -> None:
    b = JsonBody.parse(b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}')
    assert b.values == {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def test_parse_empty_object_and_surrounding_whitespace() -> None:
    assert JsonBody.parse(b"{}").values == {}
    assert JsonBody.parse(b" \r\n\t{ \n }\n ").values == {}


def test_values_decode_escapes_and_unicode() -> None:
    raw = '{"a": "\\u00e9\\n\\"q\\"", "b": "日本語", "c": "\\ud83d\\ude00"}'.encode()
    assert JsonBody.parse(raw).values == {"a": 'é\n"q"', "b": "日本語", "c": "😀"}


def test_unedited_body_is_identical() -> None:
    raw = b'{ "model" :"x" ,\n  "n": 1.0e10 , "z": -0.0 }\n'
    assert JsonBody.parse(raw).edited() == raw
    assert JsonBody.parse(raw).edited(remove=("absent",)) == raw


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "empty"),
        (b"   \n\t ", "empty"),
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got an array"),
        (b'"model"', "must be a JSON object, got a string"),
        (b"42", "must be a JSON object, got a number"),
        (b"true", "must be a JSON object, got a boolean"),
        (b"null", "must be a JSON object, got null"),
        (b'{"a": 1} {"b": 2}', "extra data"),
        (b'{"a": 1}x', "extra data"),
        (b'{"a": 1},', "extra data"),
        (b'{"a": 1', "not valid JSON"),
        (b'{"a" 1}', "expected ':'"),
        (b'{"a": 1 "b": 2}', "expected ','"),
        (b'{"a": 1,}', "expected a member name"),
        (b"{a: 1}", "expected a member name"),
        (b"{'a': 1}", "expected a member name"),
        (b'{"a": }', "not valid JSON"),
        (b'{"a": [1, 2}', "not valid JSON"),
        (b'{"a": "unterminated}', "not valid JSON"),
        (b"{", "not valid JSON"),
        (b'{"a": 01}', "not valid JSON"),
        (b'{"a\x00": 1}', "not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b'{"model": "caf\xe9"}', "not valid UTF-8"),
        (b'{"model": "\xed\xa0\x80"}', "not valid UTF-8"),
    ],
)
def test_bad_bodies_are_400(raw: bytes, fragment: str) -> None:
    with pytest.raises(GatewayError) as ei:
        JsonBody.parse(raw)
    err = ei.value
    assert err.status == 400
    assert err.type == "invalid_request_error"
    assert fragment in err.message, err.message
    body = json.loads(err.body())
    assert body["error"]["message"] == err.message


def test_invalid_utf8_names_the_byte() -> None:
    with pytest.raises(GatewayError) as ei:
        JsonBody.parse(b'{"m": "ab\xc3"}')
    assert "byte 9" in ei.value.message


def test_syntax_error_has_a_position() -> None:
    with pytest.raises(GatewayError) as ei:
        JsonBody.parse(b'{"a": tru}')
    assert "line 1 column 7" in ei.value.message


def test_very_deep_nesting_is_400_not_a_crash() -> None:
    raw = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(GatewayError) as ei:
        JsonBody.parse(raw)
    assert ei.value.status == 400


# --------------------------------------------------------------------------- replacing


def test_replace_model_preserves_everything_else() -> None:
    raw = (
        '{\n  "messages" : [ {"role":"user","content":"caf\\u00e9 \\ud83d\\ude00 日本"} ],\n'
        '  "model":   "fast-model"  ,\n'
        '  "temperature": 1.0e10, "top_p": -0.0, "n": 1E+2, "seed": 12345678901234567890,\n'
        '  "meta": {"nested": {"model": "keep-me", "x": [1.50, 2e-3]}},\n'
        '  "stop": "\\/path\\t"\n}\n'
    )
    out = edit(raw, set_values={"model": "gpt-4o"})
    assert out == raw.replace('"fast-model"', '"gpt-4o"')


def test_replace_model_with_non_ascii_value_is_utf8() -> None:
    out = JsonBody.parse(b'{"model": "a"}').edited(set_values={"model": "modèle"})
    assert out == '{"model": "modèle"}'.encode()


def test_replace_value_of_any_type() -> None:
    raw = '{"model": {"weird": true}, "x": 1}'
    assert edit(raw, set_values={"model": "m"}) == '{"model": "m", "x": 1}'


def test_add_model_when_absent() -> None:
    assert edit('{"messages": []}', set_values={"model": "gpt-4o"}) == (
        '{"model": "gpt-4o", "messages": []}'
    )


def test_add_model_to_empty_object() -> None:
    assert edit("{}", set_values={"model": "m"}) == '{"model": "m"}'
    assert edit("  { \n }  ", set_values={"model": "m"}) == '  {"model": "m" \n }  '


def test_add_model_keeps_leading_whitespace_and_rest() -> None:
    raw = '\n {\n  "messages": [],\n  "stream": true\n}'
    out = edit(raw, set_values={"model": "m"})
    assert out == '\n {"model": "m", \n  "messages": [],\n  "stream": true\n}'
    assert json.loads(out) == {"model": "m", "messages": [], "stream": True}


def test_add_model_after_removing_everything() -> None:
    out = edit('{"routing_preferences": []}', remove=("routing_preferences",), set_values={"m": 1})
    assert json.loads(out) == {"m": 1}


# --------------------------------------------------------------------------- removing


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # first
        ('{"rp": [1], "model": "a", "x": 2}', '{"model": "a", "x": 2}'),
        # middle
        ('{"model": "a", "rp": [1], "x": 2}', '{"model": "a", "x": 2}'),
        # last
        ('{"model": "a", "x": 2, "rp": [1]}', '{"model": "a", "x": 2}'),
        # only
        ('{"rp": [1]}', "{}"),
        ('{ "rp" : {"a": {"b": []}} }', "{  }"),
        # compact
        ('{"a":1,"rp":{"x":"}"},"b":2}', '{"a":1,"b":2}'),
        ('{"a":1,"rp":"]"}', '{"a":1}'),
        # multi-line
        ('{\n  "a": 1,\n  "rp": [],\n  "b": 2\n}', '{\n  "a": 1,\n  "b": 2\n}'),
        ('{\n  "a": 1,\n  "rp": []\n}', '{\n  "a": 1\n}'),
        ('{\n  "rp": [],\n  "a": 1\n}', '{\n  "a": 1\n}'),
    ],
)
def test_remove_member(raw: str, expected: str) -> None:
    out = edit(raw, remove=("rp",))
    assert out == expected
    assert json.loads(out) == {k: v for k, v in json.loads(raw).items() if k != "rp"}


@pytest.mark.parametrize(
    "raw",
    [
        '{"model": "a", "routing_preferences": [], "routing_policy": []}',
        '{"routing_preferences": [], "routing_policy": [], "model": "a"}',
        '{"routing_preferences": [], "model": "a", "routing_policy": []}',
        '{"routing_policy": [],"model": "a","x": 1,"routing_preferences": []}',
        '{"routing_preferences": [], "routing_policy": []}',
        '{"a": 1, "routing_policy": [], "b": 2, "routing_preferences": [], "c": 3}',
    ],
)
def test_remove_several_members_in_any_position(raw: str) -> None:
    keys = ("routing_preferences", "routing_policy")
    out = edit(raw, remove=keys)
    expected = {k: v for k, v in json.loads(raw).items() if k not in keys}
    assert json.loads(out) == expected
    assert list(json.loads(out)) == list(expected)


def test_remove_and_replace_together() -> None:
    raw = (
        '{"model": "alias",\n "messages": [{"role": "user", "content": "x"}],\n'
        ' "routing_preferences": [{"name": "a"}]}'
    )
    out = edit(raw, remove=("routing_preferences",), set_values={"model": "gpt-4o"})
    assert out == '{"model": "gpt-4o",\n "messages": [{"role": "user", "content": "x"}]}'


def test_remove_last_two_and_replace_the_one_before() -> None:
    raw = '{"messages": [], "model": "a", "routing_preferences": [], "routing_policy": []}'
    out = edit(raw, remove=("routing_preferences", "routing_policy"), set_values={"model": "b"})
    assert out == '{"messages": [], "model": "b"}'


@pytest.mark.parametrize(
    "raw",
    [
        '{"routing_preferences": [1], "model": "a", "routing_preferences": [2], "x": 1}',
        '{"model": "a", "x": 1, "model": "b"}',
        '{"model": "a", "routing_policy": 1, "routing_policy": 2}',
        '{"a": 1, "a": 2, "model": "m"}',
    ],
)
def test_duplicated_top_level_members_are_400(raw: str) -> None:
    # Providers disagree on which copy wins, so a duplicate could carry a model (or routes)
    # past what the gateway checked: refused, naming the member.
    with pytest.raises(GatewayError) as ei:
        JsonBody.parse(raw.encode())
    assert ei.value.status == 400
    assert "appears more than once" in ei.value.message


@pytest.mark.parametrize("raw", ['{"t": NaN}', '{"t": [Infinity]}', '{"m": {"x": -Infinity}}'])
def test_nan_and_infinity_are_400(raw: str) -> None:
    with pytest.raises(GatewayError) as ei:
        JsonBody.parse(raw.encode())
    assert ei.value.status == 400
    assert "NaN and Infinity are not allowed" in ei.value.message


def test_lone_surrogate_escapes_are_read_as_replacement_characters() -> None:
    raw = r'{"model": "m", "messages": [{"content": "hi \ud83d, \ud83d\ude00 and \uDC00"}]}'
    body = JsonBody.parse(raw.encode())
    text = body.values["messages"][0]["content"]
    assert text == "hi \ufffd, \U0001f600 and \ufffd"
    text.encode("utf-8")  # no lone surrogate left to fail later (hashing, tokenising, logging)
    # The provider still gets the client's bytes.
    assert body.edited(set_values={"model": "n"}) == raw.replace('"m"', '"n"', 1).encode()


def test_nested_keys_with_the_same_name_are_untouched() -> None:
    raw = '{"meta": {"routing_preferences": 1, "model": "inner"}, "routing_preferences": 2}'
    out = edit(raw, remove=("routing_preferences",), set_values={"model": "m"})
    assert json.loads(out) == {
        "model": "m",
        "meta": {"routing_preferences": 1, "model": "inner"},
    }
    assert '{"routing_preferences": 1, "model": "inner"}' in out


def test_keys_written_with_escapes_are_matched_by_value() -> None:
    raw = '{"mod\\u0065l": "a", "x": 1}'
    out = edit(raw, set_values={"model": "b"})
    assert out == '{"mod\\u0065l": "b", "x": 1}'


def test_string_values_containing_structural_characters() -> None:
    raw = '{"a": "{\\"model\\": 1}, ", "model": "x", "b": "\\\\"}'
    out = edit(raw, set_values={"model": "y"})
    assert out == raw.replace('"x"', '"y"')
    assert json.loads(out)["a"] == '{"model": 1}, '


# --------------------------------------------------------------------------- property-style

BODIES: list[str] = [
    "{}",
    '{"model": "a"}',
    '{"messages": [{"role": "user", "content": "hi"}]}',
    '{"model":"a","messages":[],"stream":true,"routing_preferences":[{"name":"x"}]}',
    '{\n\t"routing_policy": null,\n\t"model": "a"\n}',
    '{"temperature": 1.0e10, "top_p": -0.0, "big": 1e400, "neg": -12.5E-3}',
    '{"s": "\\u00e9\\ud83d\\ude00\\n\\t\\"", "t": "日本語 emoji 😀"}',
    '{"routing_preferences": {"deep": [[[{"a": [1, {"b": null}]}]]]}, "z": false}',
    '  {  "a"  :  1  ,  "routing_policy"  :  [  ]  ,  "b"  :  2  }  ',
    '{"model": null, "routing_preferences": "x", "routing_policy": 3}',
    '{"x": [], "y": {}, "model": "", "routing_preferences": []}',
]

EDITS: list[dict[str, Any]] = [
    {},
    {"remove": ("routing_preferences",)},
    {"remove": ("routing_preferences", "routing_policy")},
    {"set_values": {"model": "gpt-4o"}},
    {"set_values": {"model": "claude 🚀"}, "remove": ("routing_preferences", "routing_policy")},
    {"set_values": {"model": "m", "extra": {"k": [1, 2]}}, "remove": ("routing_policy",)},
]


def _expected(values: dict[str, Any], remove: tuple[str, ...], set_values: dict[str, Any]):
    out = {k: v for k, v in values.items() if k not in remove}
    for k, v in set_values.items():
        out[k] = v
    return out


@pytest.mark.parametrize("raw", BODIES)
def test_property_edits_match_the_dict_model(raw: str) -> None:
    for e in EDITS:
        remove: tuple[str, ...] = e.get("remove", ())
        set_values: dict[str, Any] = e.get("set_values", {})
        body = JsonBody.parse(raw.encode())
        assert body.values == json.loads(raw)
        out = body.edited(remove=remove, set_values=set_values).decode("utf-8")
        expected = _expected(json.loads(raw), remove, set_values)
        assert json.loads(out) == expected, (raw, e, out)
        # The edited body is itself a valid body for the next hop.
        assert JsonBody.parse(out.encode()).values == expected
        # Untouched members keep their exact text (key, separator and value spelling).
        for key, m in body._members:
            if key not in remove and key not in set_values:
                assert raw[m.start : m.value_end] in out, (raw, e, key)


def test_property_untouched_members_keep_their_exact_spelling() -> None:
    raw = (
        '{"routing_policy": [], "f": 1.0e10, "g": -0.0, "h": 1E400, "u": "\\u00e9",'
        ' "nested": {"k" : [ 1 , 2 ] }, "routing_preferences": [], "model": "x"}'
    )
    out = edit(raw, remove=("routing_policy", "routing_preferences"), set_values={"model": "y"})
    for fragment in ('"f": 1.0e10', '"g": -0.0', '"h": 1E400', '"u": "\\u00e9"'):
        assert fragment in out
    assert '"nested": {"k" : [ 1 , 2 ] }' in out
    assert out == (
        '{"f": 1.0e10, "g": -0.0, "h": 1E400, "u": "\\u00e9", "nested": {"k" : [ 1 , 2 ] },'
        ' "model": "y"}'
    )


# --------------------------------------------------------------------------- large bodies


def _large_body(n: int) -> bytes:
    msgs = [{"role": "user", "content": f"message {i} " + "x" * 200} for i in range(n)]
    return json.dumps({"model": "m", "messages": msgs, "routing_policy": [1], "z": "end"}).encode()


async def test_parse_async_equals_parse_on_large_bodies() -> None:
    raw = _large_body(20_000)  # ~4.5 MB, far above LARGE_BODY
    sync, lazy = JsonBody.parse(raw), await JsonBody.parse_async(raw)
    assert lazy.values == sync.values
    assert lazy.edited(remove=("routing_policy",), set_values={"model": "n"}) == sync.edited(
        remove=("routing_policy",), set_values={"model": "n"}
    )


async def test_parse_async_lets_other_tasks_run_while_it_parses() -> None:
    import asyncio

    from plano_extproc.body import LARGE_BODY, STEP_CHARS

    raw = _large_body(20_000)
    assert len(raw) > LARGE_BODY
    ticks = 0
    done = False

    async def other_request() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other_request())
    await asyncio.sleep(0)
    start = ticks
    await JsonBody.parse_async(raw)
    during = ticks - start
    done = True
    await task
    # The other task ran once per STEP_CHARS of the body (bounded work per loop turn), where a
    # blocking parse lets it run not at all.
    assert during >= len(raw) // STEP_CHARS - 1


@pytest.mark.parametrize(
    "raw",
    [
        b'{"messages": [1, 2,]}',
        b'{"messages": [1 2]}',
        b'{"messages": [1, NaN]}',
        b'{"messages": [1], "messages": [2]}',
        b'{"messages": [',
    ],
)
async def test_parse_async_rejects_what_parse_rejects(raw: bytes) -> None:
    import plano_extproc.body as body_mod

    padded = raw[:-1] + b" " * body_mod.LARGE_BODY + raw[-1:] if raw.endswith(b"}") else raw
    with pytest.raises(GatewayError) as sync_err:
        JsonBody.parse(padded)
    with pytest.raises(GatewayError) as async_err:
        await JsonBody.parse_async(padded)
    assert async_err.value.status == sync_err.value.status == 400


async def test_parse_async_finds_lone_surrogates_anywhere_in_a_large_body() -> None:
    msgs = [{"role": "user", "content": "x" * 300} for _ in range(5000)]
    text = json.dumps({"model": "m", "messages": msgs})
    # the escape in the middle of the history, where a chunked search could miss it
    at = len(text) // 2
    at = text.index('"x', at) + 1
    raw = (text[:at] + "\\ud83d" + text[at:]).encode()
    body = await JsonBody.parse_async(raw)
    assert any("\ufffd" in m["content"] for m in body.values["messages"])
    assert body.edited() == raw


async def test_release_empties_a_large_body_and_leaves_small_ones() -> None:
    big = await JsonBody.parse_async(_large_body(5_000))
    messages = big.values["messages"]
    await big.release()
    assert messages == [] and big.values == {}
    small = JsonBody.parse(b'{"messages": [1, 2]}')
    await small.release()
    assert small.values == {"messages": [1, 2]}
