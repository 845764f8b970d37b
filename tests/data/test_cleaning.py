"""Tests of chat-token stripping and row validation."""

from __future__ import annotations

import pytest

from brainstacks_hooks.data import CHAT_TOKEN_PATTERNS, strip_chat_tokens, validate_row


def test_pattern_list_covers_all_template_families() -> None:
    assert len(CHAT_TOKEN_PATTERNS) >= 20
    for token in ("<start_of_turn>", "<|eot_id|>", "[INST]", "<|im_start|>", "[TOOL_CALLS]", "</s>"):
        assert token in CHAT_TOKEN_PATTERNS


@pytest.mark.parametrize("token", CHAT_TOKEN_PATTERNS)
def test_each_token_is_removed(token: str) -> None:
    assert strip_chat_tokens(f"Hello {token} world{token}") == "Hello world"
    assert token not in strip_chat_tokens(f"{token}{token}x")


@pytest.mark.parametrize("token", [t for t in CHAT_TOKEN_PATTERNS if t not in ("<s>", "</s>")])
def test_matching_is_case_insensitive(token: str) -> None:
    assert strip_chat_tokens(f"a {token.upper()} b") == "a b"
    assert strip_chat_tokens(f"a {token.lower()} b") == "a b"


def test_sentence_piece_markers_are_case_sensitive() -> None:
    # a generic type parameter <S> in code is not a Llama 2 BOS
    assert strip_chat_tokens("fn f<S>(s: S)") == "fn f<S>(s: S)"


def test_role_words_after_turn_markers_are_removed() -> None:
    gemma = "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>"
    assert strip_chat_tokens(gemma) == "What is 2+2?\n4"
    chatml = (
        "<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHey"
    )
    assert strip_chat_tokens(chatml) == "Be brief\nHi\nHey"
    llama3 = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
    )
    assert strip_chat_tokens(llama3) == "Hi\n\nHello"
    assert (
        strip_chat_tokens("<s>[INST] <<SYS>>\nBe nice\n<</SYS>>\n\nHi [/INST] Hello </s>")
        == "Be nice\n\nHi Hello"
    )


def test_role_words_elsewhere_are_kept() -> None:
    assert strip_chat_tokens("user\nassistant model") == "user\nassistant model"
    assert strip_chat_tokens("<start_of_turn>username is taken") == "username is taken"


def test_whitespace_is_normalised_only_where_tokens_were_removed() -> None:
    code = "def f(x):\n    return '  a  '\n\n\n\ndef g():\n    pass"
    assert strip_chat_tokens(code) == code  # clean text stays byte-identical
    dirty = "<eos>def f(x):\n    y = 1   +  2\n\n\n\n\nreturn y  <eos>"
    assert strip_chat_tokens(dirty) == "def f(x):\n    y = 1 + 2\n\nreturn y"


def test_validate_row_reasons() -> None:
    ok = {"instruction": "Do", "input": "", "output": "Done"}
    assert validate_row(ok, 100) is None
    assert validate_row({"instruction": "Do", "output": "Done"}) is None  # input is optional
    assert validate_row({"instruction": "Do", "input": None, "output": "Done"}) is None
    assert validate_row(["not", "a", "dict"], 100) == "wrong_type:row"
    assert validate_row({"output": "x"}, 100) == "missing_field:instruction"
    assert validate_row({"instruction": "x"}, 100) == "missing_field:output"
    assert validate_row({"instruction": "x", "output": None}, 100) == "missing_field:output"
    assert validate_row({"instruction": 3, "output": "x"}, 100) == "wrong_type:instruction"
    assert validate_row({"instruction": "x", "output": ["x"]}, 100) == "wrong_type:output"
    assert validate_row({"instruction": "x", "input": 5, "output": "x"}, 100) == "wrong_type:input"
    assert validate_row({"instruction": "  ", "output": "x"}, 100) == "empty_instruction"
    assert validate_row({"instruction": "x", "output": " \n"}, 100) == "empty_output"
    assert validate_row({"instruction": "x" * 50, "input": "y" * 40, "output": "z" * 11}, 100) == "overlong"
    assert validate_row({"instruction": "x" * 50, "input": "y" * 40, "output": "z" * 10}, 100) is None
