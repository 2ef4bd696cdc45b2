"""Supervised fine-tuning data as pure functions over records, text and token lists: which
tokens a sample holds and which of them carry the loss.

Three record formats (one JSON object a line in ``training.jsonl``, ``validation.jsonl``,
``test.jsonl``):

- prompt/completion ``{"input": ..., "output": ...}``: the prompt is ``prompt_template``
  filled from the record, then ``separator``, then the completion (then EOS); the loss is on
  the completion (and EOS) by default, or on everything;
- chat ``{"messages": [{"role": ..., "content": ...}, ...]}`` and ShareGPT
  ``{"conversations": [{"from": ..., "value": ...}]}``, rendered by the tokenizer's chat
  template; the loss is on the assistant turns by default, on the last one, or on everything.

The assistant spans come from the template's ``{% generation %}`` markers where it has them
(the tokenizer's assistant mask, split into turns here), otherwise from the rendered turn
boundaries: the conversation up to each assistant turn (with the generation prompt) and up to
its end must each render as a prefix of the whole, and the turn is the text between. Where
neither holds, ``TemplateError`` names the template: a mask is never silently all ones.

    spans = assistant_char_spans(messages, render, template_name="llama3")
    mask = char_spans_to_mask(offsets, spans)        # one bool per token
    tokens, mask, cut = fit(tokens, mask, max_tokens=2049, truncation="right")
    inputs, labels, loss_mask = shift(tokens, mask)  # the model sees tokens[:-1]
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import msgspec

SPLITS = ("training", "validation", "test")  # Megatron-Bridge's file names, .jsonl
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_call": "assistant",
                  "observation": "tool"}
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


class SFTDataError(ValueError):
    """A record that cannot become a sample (missing field, wrong shape)."""


class TemplateError(SFTDataError):
    """A chat template whose assistant spans cannot be established."""


class SFTSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How records become samples (the run config's ``data.sft`` section)."""

    format: Literal["auto", "prompt_completion", "chat", "sharegpt"] = "auto"
    input_key: str = "input"
    output_key: str = "output"
    prompt_template: str = "{input}"  # str.format over the record's fields
    separator: str = " "  # between the prompt and the completion
    messages_key: str = "messages"
    conversations_key: str = "conversations"
    loss_on: Literal["answer", "last", "all"] = "answer"  # answer: completion / assistant turns
    truncation: Literal["right", "left"] = "right"
    add_bos: bool | None = None  # prompt/completion: None = when the tokenizer has a BOS
    add_eos: bool = True  # prompt/completion: EOS after the completion, a loss token
    pad_to_multiple_of: int | None = None  # None: pad every sample to model.seq_length
    min_length: int = 2  # tokens; shorter samples are dropped (and counted)
    max_length: int | None = None  # model inputs; None: model.seq_length
    pack: bool = False  # first-fit pack the samples into rows of model.seq_length at load

    def __post_init__(self):
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"data.sft.pad_to_multiple_of={self.pad_to_multiple_of} must be "
                             ">= 1 (or null: pad to model.seq_length)")
        if self.min_length < 2:
            raise ValueError(f"data.sft.min_length={self.min_length} must be >= 2 (a sample "
                             "needs an input token and a label)")


class SFTStats(msgspec.Struct, frozen=True, kw_only=True):
    """What became of a split's records."""

    records: int = 0
    samples: int = 0
    truncated: int = 0
    dropped_short: int = 0
    dropped_no_loss: int = 0

    def add(self, other: SFTStats) -> SFTStats:
        return SFTStats(**{f: getattr(self, f) + getattr(other, f)
                           for f in SFTStats.__struct_fields__})

    def describe(self) -> str:
        return (f"{self.samples} samples from {self.records} records ({self.truncated} "
                f"truncated, {self.dropped_short} dropped as shorter than data.sft.min_length, "
                f"{self.dropped_no_loss} dropped with no loss token left)")


# ---- records ------------------------------------------------------------------------------

def record_format(record: Mapping[str, Any], spec: SFTSpec) -> str:
    """``"prompt_completion"``, ``"chat"`` or ``"sharegpt"``: ``spec.format``, or for
    ``"auto"`` the first whose field the record has."""
    if spec.format != "auto":
        return spec.format
    if spec.messages_key in record:
        return "chat"
    if spec.conversations_key in record:
        return "sharegpt"
    if spec.output_key in record:
        return "prompt_completion"
    raise SFTDataError(f"record has none of {spec.messages_key!r} (chat), "
                       f"{spec.conversations_key!r} (ShareGPT) or {spec.output_key!r} "
                       f"(prompt/completion); its fields: {sorted(record)} "
                       "(set data.sft.output_key or data.sft.messages_key)")


def prompt_and_completion(record: Mapping[str, Any], spec: SFTSpec) -> tuple[str, str]:
    """(prompt text including the separator, completion text) of a prompt/completion record.

    >>> prompt_and_completion({"input": "2+2?", "output": "4"}, SFTSpec())
    ('2+2? ', '4')
    """
    completion = record.get(spec.output_key)
    if not isinstance(completion, str):
        raise SFTDataError(f"no text field {spec.output_key!r} (data.sft.output_key)")
    fields = dict(record)
    fields.setdefault("input", fields.get(spec.input_key, ""))
    try:
        prompt = spec.prompt_template.format_map(fields)
    except (KeyError, IndexError, ValueError) as e:
        raise SFTDataError(f"data.sft.prompt_template={spec.prompt_template!r} cannot be filled "
                           f"from the record's fields {sorted(record)}: {e!r}") from None
    return prompt + spec.separator, completion


def messages_of(record: Mapping[str, Any], spec: SFTSpec, fmt: str) -> list[dict[str, str]]:
    """The record's conversation as ``[{"role", "content"}]`` (ShareGPT roles translated)."""
    key = spec.messages_key if fmt == "chat" else spec.conversations_key
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise SFTDataError(f"field {key!r} is not a non-empty list of turns")
    if fmt == "chat":
        for t in turns:
            if not (isinstance(t, dict) and isinstance(t.get("role"), str)
                    and isinstance(t.get("content"), str)):
                raise SFTDataError(f"a turn of {key!r} is not {{\"role\": str, \"content\": str}}")
        return [dict(t) for t in turns]
    out = []
    for t in turns:
        role = SHAREGPT_ROLES.get(t.get("from")) if isinstance(t, dict) else None
        if role is None or not isinstance(t.get("value"), str):
            raise SFTDataError(f"a turn of {key!r} is not {{\"from\": one of "
                               f"{sorted(SHAREGPT_ROLES)}, \"value\": str}}")
        out.append({"role": role, "content": t["value"]})
    return out


# ---- masks --------------------------------------------------------------------------------

def prompt_completion_sample(prompt: Sequence[int], completion: Sequence[int], *,
                             bos: int | None, eos: int | None,
                             loss_on: str) -> tuple[list[int], list[bool]]:
    """Tokens ``[bos] + prompt + completion + [eos]`` and their loss mask: the completion and
    EOS (``loss_on="answer"`` or ``"last"``), or every token (``"all"``)."""
    head = ([bos] if bos is not None else []) + list(prompt)
    tail = list(completion) + ([eos] if eos is not None else [])
    everything = loss_on == "all"
    return head + tail, [everything] * len(head) + [True] * len(tail)


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and _GENERATION.search(template) is not None


def runs_of(mask: Sequence[bool | int]) -> list[tuple[int, int]]:
    """The ``[start, end)`` runs of true values:
    ``runs_of([0, 1, 1, 0, 1]) == [(1, 3), (4, 5)]``."""
    out, start = [], None
    for i, v in enumerate(list(mask) + [0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i))
            start = None
    return out


def assistant_char_spans(messages: Sequence[Mapping[str, str]],
                         render: Callable[[list, bool], str], *,
                         template_name: str) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the ``[start, end)`` character span of each assistant
    turn), from turn boundaries: ``render(messages[:k], add_generation_prompt=True)`` and
    ``render(messages[:k + 1], False)`` must be prefixes of the whole rendering, and the
    assistant turn ``k`` is what lies between (its text and end-of-turn marker)."""
    full = render(list(messages), False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(list(messages[:k]), True) if k else ""
        upto = render(list(messages[: k + 1]), False)
        if not (full.startswith(before) and full.startswith(upto) and len(before) < len(upto)):
            raise TemplateError(
                f"chat template {template_name!r} has no {{% generation %}} markers and its "
                f"turn boundaries cannot be inferred: the conversation up to turn {k} does not "
                "render as a prefix of the whole; add {% generation %}...{% endgeneration %} "
                "around the assistant content, or set data.sft.loss_on=all")
        spans.append((len(before), len(upto)))
    return full, spans


def char_spans_to_mask(offsets: Sequence[tuple[int, int]],
                       spans: Sequence[tuple[int, int]]) -> list[list[bool]]:
    """Per span, one bool per token: the token's characters ``offsets[i]`` overlap the span
    (zero-width tokens never do)."""
    return [[s < end and e > start for s, e in offsets] for start, end in spans]


def chat_loss_mask(turns: Sequence[Sequence[bool]], n_tokens: int,
                   loss_on: str) -> list[bool]:
    """The loss mask from per-assistant-turn token masks: their union (``"answer"``), the
    last one (``"last"``) or every token (``"all"``). Without an assistant turn only
    ``"all"`` has loss tokens."""
    if loss_on == "all":
        return [True] * n_tokens
    chosen = turns[-1:] if loss_on == "last" else turns
    return [any(t[i] for t in chosen) for i in range(n_tokens)]


def turn_masks_from_assistant_mask(assistant_mask: Sequence[int]) -> list[list[bool]]:
    """Per assistant turn (a run of ones in the template's generation mask), its token mask."""
    n = len(assistant_mask)
    return [[start <= i < end for i in range(n)] for start, end in runs_of(assistant_mask)]


# ---- lengths ------------------------------------------------------------------------------

def fit(tokens: Sequence[int], mask: Sequence[bool], *, max_tokens: int,
        truncation: str) -> tuple[list[int], list[bool], bool]:
    """At most ``max_tokens`` tokens, cut from the right or the left; and whether it cut."""
    if len(tokens) <= max_tokens:
        return list(tokens), list(mask), False
    if truncation == "left":
        return list(tokens[-max_tokens:]), list(mask[-max_tokens:]), True
    return list(tokens[:max_tokens]), list(mask[:max_tokens]), True


def shift(tokens: Sequence[int], mask: Sequence[bool]) -> tuple[list[int], list[int], list[int]]:
    """(inputs, labels, loss mask) for next-token prediction: position ``i`` reads
    ``tokens[i]`` and is scored on ``tokens[i + 1]`` when that token is a loss token."""
    return list(tokens[:-1]), list(tokens[1:]), [int(m) for m in mask[1:]]


def padded_length(n: int, *, multiple: int | None, seq_length: int) -> int:
    """The length a batch whose longest sample has ``n`` inputs is padded to: ``seq_length``
    when ``multiple`` is None, else ``n`` rounded up to ``multiple`` (at most ``seq_length``
    rounded up)."""
    if multiple is None:
        return seq_length
    return -(-max(n, 1) // multiple) * multiple


def pad(values: Sequence[int], length: int, value: int) -> list[int]:
    return list(values) + [value] * (length - len(values))


__all__ = ["SPLITS", "SFTDataError", "SFTSpec", "SFTStats", "TemplateError",
           "assistant_char_spans", "char_spans_to_mask", "chat_loss_mask", "fit",
           "has_generation_markers", "messages_of", "pad", "padded_length",
           "prompt_and_completion", "prompt_completion_sample", "record_format", "runs_of",
           "shift", "turn_masks_from_assistant_mask"]
