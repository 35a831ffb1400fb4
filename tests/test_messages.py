"""Every message type survives JSON both ways; malformed input is refused with a reason."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from channels.errors import MalformedMessage
from channels.messages import (
    FAILURE_KINDS,
    SCHEMA_VERSION,
    Budget,
    Call,
    Cancel,
    Completion,
    Execution,
    Failure,
    Log,
    Ref,
    Reply,
    Step,
    Usage,
    decode,
    encode,
)

names = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)
finite = st.floats(allow_nan=False, allow_infinity=False)
refs = st.builds(
    Ref,
    digest=st.binary(max_size=8).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest()),
    size=st.integers(0, 2**40),
    kind=st.sampled_from(["text", "bytes", "json"]),
    preview=st.text(max_size=50),
    scope=names,
)
scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | finite | st.text(max_size=30)
values = st.recursive(
    scalars | refs,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8).filter(lambda k: k != "$ref"), inner, max_size=4)
    ),
    max_leaves=12,
)
usages = st.builds(
    Usage,
    input_tokens=st.integers(0, 10**9),
    output_tokens=st.integers(0, 10**9),
    cost=st.none() | finite.filter(lambda x: x >= 0),
    model_calls=st.integers(0, 10**6),
    wall_time=finite.filter(lambda x: x >= 0),
)
budgets = st.builds(
    Budget,
    tokens=st.none() | st.integers(),
    cost=st.none() | finite,
    model_calls=st.none() | st.integers(),
)
calls = st.builds(
    Call,
    session=names,
    caller=names,
    callee=names,
    prompt=st.text(),
    context=values,
    args=st.dictionaries(st.text(max_size=8), values, max_size=3),
    depth=st.integers(0, 50),
    deadline=st.none() | finite,
    budget=st.none() | budgets,
    parent=st.none() | names,
)
messages = st.one_of(
    calls,
    st.builds(Reply, id=names, value=values, usage=usages, spilled=st.booleans()),
    st.builds(
        Failure,
        id=names,
        kind=st.sampled_from(FAILURE_KINDS),
        message=st.text(),
        partial=values,
        usage=usages,
    ),
    st.builds(Cancel, id=names, reason=st.text()),
    st.builds(Step, session=names, peer=names, n=st.integers(0, 100), detail=st.text()),
    st.builds(
        Completion, session=names, peer=names, model=st.text(), response=st.text(), usage=usages
    ),
    st.builds(
        Execution,
        session=names,
        peer=names,
        code=st.text(),
        status=st.sampled_from(["ok", "error", "timeout", "crashed"]),
        output=st.text(),
    ),
    st.builds(
        Log,
        session=names,
        peer=names,
        event=st.text(),
        fields=st.dictionaries(st.text(max_size=5), values, max_size=3),
    ),
)


@given(messages)
def test_every_message_round_trips_through_json(msg):
    assert decode(encode(msg)) == msg


@given(values)
def test_refs_nested_anywhere_come_back_as_refs(value):
    reply = decode(encode(Reply(id="x", value=value)))
    assert reply.value == value


def test_ref_repr_shows_metadata_never_the_value():
    ref = Ref(digest="sha256:" + "ab" * 32, size=40_000_000, kind="text", preview="It was a dark")
    text = repr(ref)
    assert "40.0 MB" in text and "text" in text and "It was a dark" in text
    assert len(text) < 120


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\x00\xff garbage", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"type": "call", "v": 1}', "session"),
        (b'{"type": "teleport", "v": 1}', "teleport"),
        (
            b'{"type": "call", "v": 99, "session": "s", "caller": "a", "callee": "b"}',
            "schema version 99",
        ),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(data, needle):
    with pytest.raises(MalformedMessage, match=needle):
        decode(data)


def test_schema_version_is_carried():
    assert b'"v":%d' % SCHEMA_VERSION in encode(Cancel(id="x"))


def test_usage_adds_and_unknown_cost_stays_unknown():
    a = Usage(input_tokens=1, output_tokens=2, cost=0.5, model_calls=1)
    b = Usage(input_tokens=10, output_tokens=20, cost=None, model_calls=2)
    total = a + b
    assert (total.input_tokens, total.output_tokens, total.model_calls) == (11, 22, 3)
    assert total.cost is None
    assert (a + a).cost == 1.0


def test_booleans_and_whole_floats_keep_their_type_across_the_wire():
    reply = Reply(value={"ok": True, "no": False, "two": 2.0, "one": 1, "mixed": [True, 0, 0.5]})
    for value in (reply.value, decode(encode(reply)).value):
        assert value == {"ok": True, "no": False, "two": 2.0, "one": 1, "mixed": [True, 0, 0.5]}
        assert [type(value[k]) for k in ("ok", "two", "one")] == [bool, float, int]
        assert type(value["mixed"][0]) is bool
