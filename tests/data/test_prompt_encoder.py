"""One prompt encoder: generation feeds the model exactly the prompt tokens training saw.

The tokenizer here adds BOS by default (a post-processor) while its chat template has none, like Llama-2-style
templates (the TinyLlama chat model): the case where tokenising template text with ``add_special_tokens=False``
silently drops the BOS that training prompts start with.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from brainstacks_hooks.data.formatting import encode_example, encode_prompt, encode_prompt_batch
from brainstacks_hooks.inference.routed_model import GenerationSettings, RoutedModel
from brainstacks_hooks.testing import make_tiny_llama

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "reverse", "a", "string", "what", "is", "2", "+",
         "?", "use", "slicing", "4", "the", "answer"]


def bos_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                          "{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}")
    return fast


PROMPTS = [("reverse a string", ""), ("what is 2 + 2 ?", "")]


def test_the_tokenizer_is_the_dangerous_kind():
    tok = bos_tokenizer()
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # BOS by default
    text = tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False, add_generation_prompt=True)
    assert "<s>" not in text  # ... and a template without it
    assert tok(text, add_special_tokens=False)["input_ids"][0] != tok.bos_token_id


def test_training_prompts_start_with_bos_and_prefix_the_training_example():
    tok = bos_tokenizer()
    for instruction, inp in PROMPTS:
        prompt = encode_prompt(tok, instruction, inp)["input_ids"]
        assert prompt[0] == tok.bos_token_id
        example = encode_example(tok, instruction, inp, "the answer", max_length=64)
        n_prompt = sum(1 for y in example["labels"] if y == -100)
        assert example["input_ids"][:n_prompt] == prompt


def test_batched_left_padded_prompts_equal_the_training_prompts():
    tok = bos_tokenizer()
    batch = encode_prompt_batch(tok, PROMPTS)
    for row, mask, (instruction, inp) in zip(batch["input_ids"], batch["attention_mask"], PROMPTS):
        want = encode_prompt(tok, instruction, inp)["input_ids"]
        assert row[mask.bool()].tolist() == want
        assert mask.tolist() == [0] * (len(row) - len(want)) + [1] * len(want)  # left padding


def test_generation_inputs_equal_training_prompt_inputs_token_for_token():
    tok = bos_tokenizer()
    model = make_tiny_llama(vocab_size=len(WORDS))
    seen = {}

    def fake_generate(input_ids, attention_mask, **kw):
        seen["ids"], seen["mask"] = input_ids.clone(), attention_mask.clone()
        return torch.cat([input_ids, torch.full((input_ids.shape[0], 1), tok.eos_token_id)], 1)

    model.generate = fake_generate
    rm = RoutedModel(model, tok, stacks=None, store=None)
    rm._generate_batch([p for p, _ in PROMPTS], GenerationSettings(max_new_tokens=1), streamer=None)
    for row, mask, (instruction, inp) in zip(seen["ids"], seen["mask"], PROMPTS):
        assert row[mask.bool()].tolist() == encode_prompt(tok, instruction, inp)["input_ids"]
