from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from channels import subjects
from channels.errors import InvalidName

tokens = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)


@given(tokens, tokens, tokens, tokens)
def test_subjects_parse_back(session, peer, caller, type_):
    assert subjects.parse(subjects.call(session, peer, caller)) == subjects.Subject(
        session, "call", peer, caller=caller
    )
    assert subjects.parse(subjects.cancel(session, peer, caller)).verb == "cancel"
    assert subjects.parse(subjects.event(session, peer, type_)).type == type_


def test_a_server_listens_to_every_caller_and_replies_stay_in_the_callers_inbox():
    assert subjects.call("s", "critic", subjects.ANY) == "council.s.call.critic.*"
    assert subjects.cancel("s", "critic", subjects.ANY) == "council.s.cancel.critic.*"
    assert subjects.is_reply_to("_INBOX.s.chair.abc.1", "s", "chair")
    assert not subjects.is_reply_to("_INBOX.s.chairman.abc.1", "s", "chair")
    assert not subjects.is_reply_to("_INBOX.s.critic.abc.1", "s", "chair")
    assert not subjects.is_reply_to("council.s.call.critic.chair", "s", "chair")
    assert not subjects.is_reply_to(None, "s", "chair")
    with pytest.raises(InvalidName):
        subjects.parse("council.s.call.critic")  # no caller token


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
        subjects.call("s1", name, "c")


def test_non_council_subjects_are_refused():
    with pytest.raises(InvalidName):
        subjects.parse("other.s.call.p")
