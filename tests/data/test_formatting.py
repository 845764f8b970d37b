"""Tests of the shared prompt format: completion-only labels, truncation, BOS handling, collator."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from brainstacks_hooks.data import (
    IGNORE_INDEX,
    CompletionCollator,
    build_messages,
    encode_example,
    encode_prompt,
    format_prompt,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CORPUS = [
    "Hello world, how are you?\n\nI am fine, thank you.",
    "def add(a, b):\n    return a + b\n\n\n\n",
    "x\n\n\n\n\ny",
    "The answer is 42. The question is long.",
] * 20


def _bpe(special: list[str], vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def chatml() -> PreTrainedTokenizerFast:
    """Tiny byte-level BPE tokenizer with a ChatML template, EOS = <|im_end|>, no BOS (like SmolLM2)."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def bos_tok() -> PreTrainedTokenizerFast:
    """Tokenizer that adds <s> by default (like Gemma/Llama); no chat template set."""
    raw = _bpe(["<s>", "</s>", "<pad>", "<start_of_turn>", "<end_of_turn>"])
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_build_messages() -> None:
    assert build_messages("Do it") == [{"role": "user", "content": "Do it"}]
    assert build_messages("Do it", "data")[0]["content"] == "Do it\n\ndata"
    assert build_messages("Do it", "  ")[0]["content"] == "Do it"
    msgs = build_messages("Do it", system="Be brief")
    assert msgs[0] == {"role": "system", "content": "Be brief"} and msgs[1]["role"] == "user"


def test_format_prompt_uses_chat_template(chatml: PreTrainedTokenizerFast) -> None:
    text = format_prompt(chatml, "Say hi", "now")
    assert text == "<|im_start|>user\nSay hi\n\nnow<|im_end|>\n<|im_start|>assistant\n"


def test_completion_only_labels(chatml: PreTrainedTokenizerFast) -> None:
    prompt = encode_prompt(chatml, "Say hi", "now")["input_ids"]
    ex = encode_example(chatml, "Say hi", "now", "Hello world, how are you?", max_length=256)
    assert ex is not None
    ids, labels = ex["input_ids"], ex["labels"]
    n = len(prompt)
    assert ids[:n] == prompt  # the prompt seen in training is the prompt seen at inference
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:] and all(t != IGNORE_INDEX for t in labels[n:])
    assert ex["attention_mask"] == [1] * len(ids)
    assert ids[-1] == chatml.eos_token_id  # the template's end-of-turn closes the answer, exactly once
    assert chatml.decode(ids[n:]) == "Hello world, how are you?<|im_end|>"


def test_boundary_merge_falls_back_to_separate_tokenization(chatml: PreTrainedTokenizerFast) -> None:
    # The prompt ends with "\n"; an answer starting with "\n\n" makes byte-level BPE merge across the edge.
    prompt_text = format_prompt(chatml, "Say hi")
    prompt = encode_prompt(chatml, "Say hi")["input_ids"]
    joint = chatml(prompt_text + "\n\n\nHello<|im_end|>", add_special_tokens=False)["input_ids"]
    assert joint[: len(prompt)] != prompt, "fixture tokenizer should merge across the boundary"
    ex = encode_example(chatml, "Say hi", "", "\n\n\nHello", max_length=256)
    assert ex is not None
    assert ex["input_ids"][: len(prompt)] == prompt
    assert ex["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert chatml.decode(ex["input_ids"][len(prompt) :]) == "\n\n\nHello<|im_end|>"


def test_truncation_cuts_completion_tail(chatml: PreTrainedTokenizerFast) -> None:
    prompt = encode_prompt(chatml, "Say hi")["input_ids"]
    long_output = "The answer is 42. " * 50
    ex = encode_example(chatml, "Say hi", "", long_output, max_length=len(prompt) + 20)
    assert ex is not None
    assert len(ex["input_ids"]) == len(prompt) + 20 == len(ex["labels"])
    assert ex["input_ids"][: len(prompt)] == prompt
    assert chatml.eos_token_id not in ex["input_ids"][len(prompt) :]  # a cut answer never learns to stop
    assert sum(t != IGNORE_INDEX for t in ex["labels"]) == 20


def test_overlong_prompt_returns_none(chatml: PreTrainedTokenizerFast) -> None:
    prompt = encode_prompt(chatml, "Say hi")["input_ids"]
    long_output = "The answer is 42. " * 50
    assert encode_example(chatml, "Say hi", "", long_output, max_length=len(prompt) + 7) is None
    assert encode_example(chatml, "Say hi", "", long_output, max_length=len(prompt) - 1) is None
    assert encode_example(chatml, "Say hi", "", long_output, max_length=len(prompt) + 8) is not None
    # a short answer that fits entirely is kept even with little room
    assert encode_example(chatml, "Say hi", "", "42", max_length=len(prompt) + 3) is not None


@pytest.mark.parametrize("max_length", range(1, 60, 3))
def test_never_all_masked(chatml: PreTrainedTokenizerFast, max_length: int) -> None:
    ex = encode_example(chatml, "Say hi", "now", "Hello world, how are you? I am fine.", max_length)
    if ex is not None:
        assert len(ex["input_ids"]) <= max_length
        assert any(t != IGNORE_INDEX for t in ex["labels"])


def test_bos_never_doubled_nor_missing(bos_tok: PreTrainedTokenizerFast) -> None:
    bos = bos_tok.bos_token_id
    assert bos_tok("a")["input_ids"][0] == bos  # the tokenizer adds BOS by default
    # template without BOS: the tokenizer's default BOS is kept
    plain = encode_prompt(bos_tok, "hi")["input_ids"]
    assert plain[0] == bos and plain.count(bos) == 1
    # template that writes {{ bos_token }} itself: still exactly one BOS
    tok = bos_tok.__class__(tokenizer_object=bos_tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    tok.chat_template = GEMMA_LIKE
    ids = encode_prompt(tok, "hi")["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1
    ex = encode_example(tok, "hi", "", "hello world", max_length=64)
    assert ex is not None and ex["input_ids"].count(bos) == 1
    # the template's <end_of_turn> closes the answer; no extra EOS is appended
    assert tok.decode(ex["input_ids"][-1:]) == "<end_of_turn>"
    assert tok.eos_token_id not in ex["input_ids"]


def test_system_folded_when_template_rejects_it(bos_tok: PreTrainedTokenizerFast) -> None:
    tok = bos_tok.__class__(tokenizer_object=bos_tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    tok.chat_template = GEMMA_LIKE
    text = format_prompt(tok, "hi", system="Be brief")
    assert text == "<s><start_of_turn>user\nBe brief\n\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_fallback_template_without_chat_template(bos_tok: PreTrainedTokenizerFast) -> None:
    assert not bos_tok.chat_template
    text = format_prompt(bos_tok, "hi", "x", system="Sys")
    assert text == "Sys\n\n### Instruction:\nhi\n\nx\n\n### Response:\n"
    ex = encode_example(bos_tok, "hi", "x", "hello world", max_length=128)
    assert ex is not None
    assert ex["input_ids"][-1] == bos_tok.eos_token_id and ex["labels"][-1] == bos_tok.eos_token_id
    n = len(encode_prompt(bos_tok, "hi", "x")["input_ids"])
    assert bos_tok.decode(ex["input_ids"][n:]) == "hello world</s>"


def test_template_mismatch_labels_raw_output_plus_eos(chatml: PreTrainedTokenizerFast) -> None:
    tok = chatml.__class__(tokenizer_object=chatml.backend_tokenizer, eos_token="<|im_end|>")
    # the generation prompt differs from how the assistant turn is rendered in a full conversation
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}answer:{% endif %}"
    )
    ex = encode_example(tok, "Say hi", "", "Hello", max_length=128)
    assert ex is not None
    n = len(encode_prompt(tok, "Say hi")["input_ids"])
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert tok.decode(ex["input_ids"][n:]) == "Hello<|im_end|>"


def test_encode_prompt_truncation_keeps_tail_and_bos(bos_tok: PreTrainedTokenizerFast) -> None:
    full = encode_prompt(bos_tok, "The answer is 42. " * 10)["input_ids"]
    cut = encode_prompt(bos_tok, "The answer is 42. " * 10, max_length=12)
    assert len(cut["input_ids"]) == 12 == len(cut["attention_mask"])
    assert cut["input_ids"][0] == bos_tok.bos_token_id
    assert cut["input_ids"][1:] == full[-11:]


def test_collator_pads_right(chatml: PreTrainedTokenizerFast) -> None:
    exs = [encode_example(chatml, "Say hi", "", out, max_length=256) for out in ("Hi", "Hello world, how?")]
    assert all(e is not None for e in exs)
    pad = chatml.pad_token_id
    batch = CompletionCollator(pad_token_id=pad)(exs)  # type: ignore[arg-type]
    lengths = [len(e["input_ids"]) for e in exs]  # type: ignore[index]
    assert batch["input_ids"].shape == (2, max(lengths)) and batch["input_ids"].dtype == torch.long
    short = lengths.index(min(lengths))
    gap = max(lengths) - min(lengths)
    assert batch["input_ids"][short, -gap:].tolist() == [pad] * gap
    assert batch["attention_mask"][short, -gap:].tolist() == [0] * gap
    assert batch["labels"][short, -gap:].tolist() == [IGNORE_INDEX] * gap
    assert batch["labels"][short, : min(lengths)].tolist() == exs[short]["labels"]  # type: ignore[index]

    multi = CompletionCollator(pad_token_id=pad, pad_to_multiple_of=8)(exs)  # type: ignore[arg-type]
    assert multi["input_ids"].shape[1] % 8 == 0 and multi["input_ids"].shape[1] >= max(lengths)


def test_collator_without_labels_and_with_tensors() -> None:
    feats = [{"input_ids": torch.tensor([5, 6, 7])}, {"input_ids": [8]}]
    batch = CompletionCollator(pad_token_id=0)(feats)
    assert "labels" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="empty batch"):
        CompletionCollator(pad_token_id=0)([])


@pytest.mark.slow
def test_real_smollm2_tokenizer_on_shared_rows() -> None:
    """The embedded SmolLM2 tokenizer (from its GGUF) on real rows of every domain."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from brainstacks_hooks.data import load_domain_rows

    embedded = pytest.importorskip("brainstacks_hooks.models.embedded")
    data_dir = Path("/work/shared/data")
    try:
        gguf = embedded.find_gguf(download=False)
    except Exception as e:  # BackendUnavailable or ConfigError: no local GGUF
        pytest.skip(f"embedded GGUF not available: {e}")
    if not data_dir.is_dir():
        pytest.skip("shared/data not present")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for domain in ("chat", "code", "math", "medical", "reasoning"):
        rows, _ = load_domain_rows(domain, "val", data_dir=data_dir, n=15, seed=0)
        for row in rows:
            prompt = encode_prompt(tok, row["instruction"], row["input"])["input_ids"]
            ex = encode_example(tok, row["instruction"], row["input"], row["output"], max_length=4096)
            assert ex is not None, row["id"]
            n = len(prompt)
            assert ex["input_ids"][:n] == prompt and ex["labels"][:n] == [IGNORE_INDEX] * n
            assert tok.decode(ex["input_ids"][n:]) == row["output"] + "<|im_end|>", row["id"]
            assert ex["input_ids"].count(tok.eos_token_id) == prompt.count(tok.eos_token_id) + 1
