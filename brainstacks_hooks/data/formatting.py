"""The one prompt format shared by SFT, router features, the oracle, evaluation and inference.

Every code path that turns an ``(instruction, input)`` pair into tokens goes through this module, so
training and inference can never disagree on the template, BOS handling or trailing newline (the
reference implementation trained on an Alpaca template and served with another; see
``shared/research/reference_impl.md`` section 11.1 item 5).

* The prompt is the base model's own chat template with ``add_generation_prompt=True``.
* Tokenizers without a chat template use :data:`FALLBACK_TEMPLATE`
  (``### Instruction:`` / ``### Response:``) followed by ``eos_token`` after the answer.
* Template text is tokenized with ``add_special_tokens=False``; a BOS token is prepended only when the
  tokenizer adds one by default and the rendered template does not already start with it (no double BOS
  on Gemma/Llama 3 templates, no missing BOS on templates that leave it to the tokenizer).
* Training labels are completion-only: prompt tokens are ``-100``, the answer and the template's
  end-of-turn marker (or EOS) are learned. Over-long examples lose the *tail* of the answer (and with it
  the end-of-turn token, so the model never learns to stop at a cut point), never the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..utils.logging import get_logger

logger = get_logger(__name__)

IGNORE_INDEX = -100
#: Template used when the tokenizer has no chat template. ``{system_block}`` is ``"<system>\n\n"`` or "".
FALLBACK_TEMPLATE = "{system_block}### Instruction:\n{user}\n\n### Response:\n"
_WARNED_TEMPLATES: set[str] = set()


def build_messages(instruction: str, input: str = "", system: str | None = None) -> list[dict[str, str]]:
    """Return chat messages for one prompt: an optional system turn and one user turn.

    The user content is ``instruction``, followed by a blank line and ``input`` when ``input`` is
    non-empty (after stripping whitespace).
    """
    user = instruction if not (input and input.strip()) else f"{instruction}\n\n{input}"
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    return messages


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Render messages with the chat template; fold the system turn into the user turn if rejected."""
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja2 TemplateError from raise_exception() ("System role not supported")
        if messages[0]["role"] != "system":
            raise
        logger.debug("chat template rejected a system turn (%s); folding it into the user turn", e)
        folded = [{"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}]
        return tokenizer.apply_chat_template(
            folded + messages[2:], tokenize=False, add_generation_prompt=add_generation_prompt
        )


def format_prompt(tokenizer: Any, instruction: str, input: str = "", system: str | None = None) -> str:
    """Return the prompt text, ending where the model's answer starts.

    Uses the tokenizer's chat template with ``add_generation_prompt=True``; without a chat template,
    :data:`FALLBACK_TEMPLATE` is used.
    """
    messages = build_messages(instruction, input, system)
    if not _has_chat_template(tokenizer):
        system_block = f"{system}\n\n" if system else ""
        return FALLBACK_TEMPLATE.format(system_block=system_block, user=messages[-1]["content"])
    return _render(tokenizer, messages, add_generation_prompt=True)


def _completion_text(
    tokenizer: Any, prompt: str, instruction: str, input: str, output: str, system: str | None
) -> str:
    """Answer text as the template renders it after ``prompt`` (answer + end-of-turn marker)."""
    if not _has_chat_template(tokenizer):
        return output
    messages = [*build_messages(instruction, input, system), {"role": "assistant", "content": output}]
    full = _render(tokenizer, messages, add_generation_prompt=False)
    if full.startswith(prompt):
        # Trailing newlines after the end-of-turn marker are not part of the answer.
        return full[len(prompt) :].rstrip("\n")
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if name not in _WARNED_TEMPLATES:
        _WARNED_TEMPLATES.add(name)
        logger.warning(
            "chat template of %s renders the assistant turn differently from its generation prompt; "
            "labelling the raw output followed by EOS instead",
            name,
        )
    return output


def _add_bos_by_default(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_text(tokenizer: Any, text: str, *, allow_bos: bool = True) -> list[int]:
    """Tokenise rendered template text the one way (no special tokens; BOS added by the rule above)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if allow_bos and _add_bos_by_default(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def _needs_eos(tokenizer: Any, completion: str, output: str) -> bool:
    """True when the rendered answer carries no end-of-turn marker (the template adds nothing after it)."""
    eos = getattr(tokenizer, "eos_token", None)
    if eos and completion.endswith(eos):
        return False
    return completion.rstrip().endswith(output.strip())


def encode_prompt(
    tokenizer: Any,
    instruction: str,
    input: str = "",
    max_length: int | None = None,
    system: str | None = None,
) -> dict[str, list[int]]:
    """Tokenize a prompt exactly as :func:`encode_example` does (for router features and generation).

    When the prompt is longer than ``max_length`` its *head* is cut (the leading BOS, if any, is kept),
    because the end of the prompt holds the generation cue the model must see last.

    Returns:
        ``{"input_ids": [...], "attention_mask": [...]}``.
    """
    ids = encode_text(tokenizer, format_prompt(tokenizer, instruction, input, system))
    ids = _cut_head(tokenizer, ids, max_length)
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def _cut_head(tokenizer: Any, ids: list[int], max_length: int | None) -> list[int]:
    if max_length is not None and len(ids) > max_length:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None and ids[0] == bos and max_length > 1:
            ids = [bos, *ids[len(ids) - (max_length - 1) :]]
        else:
            ids = ids[len(ids) - max_length :]
    return ids


def encode_example(
    tokenizer: Any,
    instruction: str,
    input: str,
    output: str,
    max_length: int,
    *,
    system: str | None = None,
    min_completion_tokens: int = 8,
) -> dict[str, list[int]] | None:
    """Tokenize one SFT example with completion-only labels.

    The prompt is tokenized alone and as part of the full text; when its tokens are an exact prefix of
    the full text's tokens, the full tokenization is used. If the tokenizer merges tokens across the
    prompt/answer boundary, the prompt's own tokens are concatenated with the separately tokenized
    answer, so the prompt seen in training is always token-identical to :func:`encode_prompt`.

    The answer is followed by the template's end-of-turn marker, or by ``eos_token_id`` when the template
    renders nothing after the answer (or there is no chat template).

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on prompt tokens), or ``None`` when
        the example is over-long: the completion must be truncated and the prompt leaves fewer than
        ``min_completion_tokens`` answer tokens. Never returns an example without a labelled token.
    """
    prompt_text = format_prompt(tokenizer, instruction, input, system)
    prompt_ids = encode_text(tokenizer, prompt_text)
    completion = _completion_text(tokenizer, prompt_text, instruction, input, output, system)
    full_ids = encode_text(tokenizer, prompt_text + completion)
    n_prompt = len(prompt_ids)
    if full_ids[:n_prompt] == prompt_ids and len(full_ids) > n_prompt:
        completion_ids = full_ids[n_prompt:]
    else:
        logger.debug("prompt tokens are not a prefix of the full text; tokenizing the answer separately")
        completion_ids = encode_text(tokenizer, completion, allow_bos=False)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is not None and _needs_eos(tokenizer, completion, output):
        completion_ids = [*completion_ids, eos_id]
    if not completion_ids:
        return None
    if n_prompt + len(completion_ids) > max_length:
        room = max_length - n_prompt
        if room < max(1, min_completion_tokens):
            return None
        completion_ids = completion_ids[:room]
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * n_prompt + completion_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def encode_rows(tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int) -> tuple[list[dict[str, Any]], int]:
    """:func:`encode_example` over rows (``instruction``, ``input``, ``output``, ``id``).

    Returns the encoded examples (each with its row ``id``) and how many rows were too long to keep.
    """
    out, overlong = [], 0
    for r in rows:
        ex = encode_example(tokenizer, r["instruction"], r.get("input", "") or "", r["output"], max_length)
        if ex is None:
            overlong += 1
            continue
        out.append({**ex, "id": r["id"]})
    return out, overlong


def encode_prompt_batch(
    tokenizer: Any,
    prompts: Sequence[tuple[str, str] | str],
    max_length: int | None = None,
    system: str | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded batch of prompts, each token for token what :func:`encode_prompt` (and so training) gives.

    This is how generation and evaluation feed prompts to the model: left padding keeps every prompt's last
    token at the end of the row, where generation continues.

    Returns:
        ``{"input_ids": [B, L], "attention_mask": [B, L]}`` (int64; padding is ``pad_token_id`` with mask 0).
    """
    if not prompts:
        raise ValueError("encode_prompt_batch needs at least one prompt")
    rows = []
    for p in prompts:
        instruction, inp = (p, "") if isinstance(p, str) else p
        rows.append(encode_prompt(tokenizer, instruction, inp, max_length=max_length, system=system)["input_ids"])
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
    pad = int(pad) if pad is not None else 0
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)  # [B, L]
    mask = torch.zeros(len(rows), length, dtype=torch.long)  # [B, L]
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, length - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _as_list(value: Any) -> list[int]:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return list(value)


@dataclass
class CompletionCollator:
    """Right-pad a batch of encoded examples; usable as a HF ``Trainer`` ``data_collator``.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and ``labels`` with
    ``-100``. Features without ``attention_mask`` get ones; ``labels`` are emitted only when every
    feature has them. Other keys are ignored.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = IGNORE_INDEX

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("CompletionCollator got an empty batch")
        ids = [_as_list(f["input_ids"]) for f in features]
        length = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = ((length + m - 1) // m) * m
        masks = [
            _as_list(f["attention_mask"]) if "attention_mask" in f else [1] * len(x)
            for f, x in zip(features, ids)
        ]
        batch = {
            "input_ids": torch.tensor([x + [self.pad_token_id] * (length - len(x)) for x in ids]),
            "attention_mask": torch.tensor([m + [0] * (length - len(m)) for m in masks]),
        }
        if all("labels" in f for f in features):
            labels = [_as_list(f["labels"]) for f in features]
            batch["labels"] = torch.tensor(
                [y + [self.label_pad_token_id] * (length - len(y)) for y in labels]
            )
        return batch
