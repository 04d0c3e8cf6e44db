"""Tokenisation of task examples and batch collation.

Classification: ``[bos] instruction text`` for decoders (the head reads the last
non-pad token), ``[cls] text [sep]`` for encoders (the head reads the first token).
Generative: ``[bos] instruction text answer :`` followed by the class name and
``<eos>`` (instruction data: its output); the LM loss covers only the answer tokens, and evaluation generates from the
prompt and scores an exact match of the answer tokens (``<eos>`` included).
Texts are truncated (never the instruction or the answer) to ``max_length`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .data import TaskData

IGNORE_INDEX = -100
ANSWER_PROMPT = "answer :"


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    task: int
    label: int  # class index
    answer_len: int = 0  # generative: the trailing answer tokens (eos included)


def _special(tokenizer: Any, names: Sequence[str]) -> Optional[int]:
    for n in names:
        v = getattr(tokenizer, n, None)
        if v is not None:
            return int(v)
    return None


class Encoder:
    """Turns :class:`TaskData` examples into token ids for one model kind and mode."""

    def __init__(self, tokenizer: Any, mode: str, is_encoder: bool, max_length: int) -> None:
        if mode == "generative" and is_encoder:
            raise ValueError("train.mode=generative needs a causal LM; the model is an encoder")
        self.tok = tokenizer
        self.mode = mode
        self.is_encoder = is_encoder
        self.max_length = int(max_length)
        self.pad_id = _special(tokenizer, ("pad_token_id", "eos_token_id"))
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        self.eos_id = _special(tokenizer, ("eos_token_id", "sep_token_id"))
        start = ("cls_token_id", "bos_token_id") if is_encoder else ("bos_token_id",)
        self.prefix = [i for i in [_special(tokenizer, start)] if i is not None]
        end = _special(tokenizer, ("sep_token_id", "eos_token_id")) if is_encoder else None
        self.suffix = [end] if end is not None else []
        if mode == "generative" and self.eos_id is None:
            raise ValueError("train.mode=generative needs a tokenizer with an eos token")

    def _ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def answer_ids(self, task: TaskData, example) -> list[int]:
        """The class name (or an instruction example's output), then ``<eos>``."""
        text = example.answer if example.answer is not None else task.label_names[example.label]
        return self._ids(" " + text) + [self.eos_id]

    def encode(self, task: TaskData, task_index: int, example) -> Encoded:
        text_ids = self._ids(example.text)
        if self.is_encoder:
            head, tail = list(self.prefix), list(self.suffix)
        else:
            head = self.prefix + self._ids(task.instruction)
            tail = self._ids(ANSWER_PROMPT) if self.mode == "generative" else []
        answer = self.answer_ids(task, example) if self.mode == "generative" else []
        budget = self.max_length - len(head) - len(tail) - len(answer)
        if budget < 1:
            raise ValueError(
                f"data.max_length={self.max_length} leaves no room for the text of task {task.name!r} "
                f"(instruction, prompt and answer take {self.max_length - budget} tokens)"
            )
        ids = head + text_ids[:budget] + tail + answer
        return Encoded(ids, task_index, example.label, len(answer))


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if left:
            out[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        else:
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate(items: Sequence[Encoded], pad_id: int, mode: str) -> dict[str, Tensor]:
    """Right-padded training/scoring batch: input_ids, attention_mask, task_ids, labels,
    and for the generative mode lm_labels (answer tokens only)."""
    ids = _pad([e.input_ids for e in items], pad_id)
    mask = _pad([[1] * len(e.input_ids) for e in items], 0)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "task_ids": torch.tensor([e.task for e in items], dtype=torch.long),
        "labels": torch.tensor([e.label for e in items], dtype=torch.long),
    }
    if mode == "generative":
        lm = torch.full_like(ids, IGNORE_INDEX)
        for i, e in enumerate(items):
            n = len(e.input_ids)
            lm[i, n - e.answer_len:n] = ids[i, n - e.answer_len:n]
        batch["lm_labels"] = lm
    return batch


def collate_prompts(items: Sequence[Encoded], pad_id: int) -> tuple[dict[str, Tensor], list[list[int]]]:
    """Left-padded prompts (answers removed) for generation, and the gold answer ids."""
    prompts = [e.input_ids[:len(e.input_ids) - e.answer_len] for e in items]
    answers = [e.input_ids[len(e.input_ids) - e.answer_len:] for e in items]
    batch = {
        "input_ids": _pad(prompts, pad_id, left=True),
        "attention_mask": _pad([[1] * len(p) for p in prompts], 0, left=True),
        "task_ids": torch.tensor([e.task for e in items], dtype=torch.long),
    }
    return batch, answers
