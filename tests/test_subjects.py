from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from channels import subjects
from channels.errors import InvalidName

tokens = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)


@given(tokens, tokens, tokens)
def test_subjects_parse_back(session, peer, type_):
    assert subjects.parse(subjects.call(session, peer)) == subjects.Subject(session, "call", peer)
    assert subjects.parse(subjects.cancel(session, peer)).verb == "cancel"
    assert subjects.parse(subjects.event(session, peer, type_)).type == type_


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("a.b", "'.' at position 1"),
        ("crit*c", "wildcard"),
        ("x>", "wildcard"),
        ("two words", "' ' at position 3"),
        ("naïve", "ASCII"),
        ("", "non-empty"),
        ("x" * 65, "limit is 64"),
    ],
)
def test_unsafe_names_are_refused_saying_which_character_and_why(name, why):
    with pytest.raises(InvalidName, match=why):
        subjects.call("s1", name)


def test_non_council_subjects_are_refused():
    with pytest.raises(InvalidName):
        subjects.parse("other.s.call.p")
