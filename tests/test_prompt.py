from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agents.prompt import PeerSpec, code_blocks, describe_input, system_prompt
from channels.messages import Ref


def test_only_python_fences_run_in_order():
    reply = (
        'Let me look.\n```python\nx = 1\n```\nthen\n```json\n{"a": 1}\n```\n'
        "```py\nprint(x)\n```\n```repl\nFINAL(x)\n```\n```\nplain\n```"
    )
    assert code_blocks(reply) == ["x = 1", "print(x)", "FINAL(x)"]


def test_an_unterminated_last_block_still_runs():
    assert code_blocks("```python\nprint('cut off')") == ["print('cut off')"]


def test_no_code_no_blocks():
    assert code_blocks("The answer is 42.") == []


@given(st.text(alphabet=st.characters(blacklist_characters="`"), min_size=1).filter(str.strip))
def test_any_body_survives_fencing(body):
    assert code_blocks(f"```python\n{body}\n```") == [body.rstrip()]


def test_input_is_announced_by_metadata_not_content():
    big = "word " * 1_000_000
    text = describe_input(big)
    assert "5,000,000" in text and len(text) < 400
    ref = Ref(digest="sha256:" + "0" * 64, size=40_000_000, kind="text", preview="Chapter 1")
    assert "40,000,000" in describe_input(ref) and "Chapter 1" in describe_input(ref)


def test_system_prompt_lists_peers_and_final_protocol():
    text = system_prompt(
        [PeerSpec("critic", "finds flaws"), PeerSpec("llm", "a small model")],
        instructions="Be brief.",
    )
    for needle in ("critic(", "finds flaws", "llm.map", "FINAL(", "FINAL_VAR", "Be brief."):
        assert needle in text
