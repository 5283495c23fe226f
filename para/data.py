"""Training data: JSONL examples, tokenized into (prompt, response) pairs, padded into batches.

Each line is {"prompt": ..., "response": ...} or Alpaca-style {"instruction", "input", "output"}
(prompt = instruction, then a blank line and the input when the input is not empty). The
prompt is tokenized alone, exactly as generate.py will tokenize it; the response follows
with EOS, and only response tokens (and EOS) carry loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from para.files import read_jsonl, string_field
from para.errors import UserError

IGNORE = -100  # label of tokens that carry no loss


@dataclass
class Example:
    prompt: list[int]
    response: list[int]   # ends with EOS


def prompt_and_response(obj: dict, where: str) -> tuple[str, str]:
    """The example's prompt and response texts; neither may be empty (a chat template or BOS
    would hide an empty prompt from a check on tokens)."""
    if "prompt" in obj or "response" in obj:
        prompt, response = string_field(obj, "prompt", where), string_field(obj, "response", where)
    elif "instruction" in obj or "output" in obj:
        instruction = string_field(obj, "instruction", where)
        extra = string_field(obj, "input", where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        response = string_field(obj, "output", where)
    else:
        raise UserError(f"{where}: expected fields 'prompt' and 'response' (or 'instruction', 'input', 'output')")
    for name, text in (("prompt", prompt), ("response", response)):
        if not text.strip():
            raise UserError(f"{where}: the {name} is empty; every example needs both")
    return prompt, response


def truncate(prompt: list[int], response: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Fit an example into max_len tokens: the response keeps at most half, then the prompt
    loses tokens from its start (its end, which PARA pools, stays), then the response loses
    tokens from its end."""
    if len(prompt) + len(response) <= max_len:
        return prompt, response
    response = response[:max(max_len - len(prompt), max_len // 2)]
    return prompt[max(0, len(prompt) + len(response) - max_len):], response


def read_examples(path: Path, tokenizer, chat: bool = False, max_len: int = 2048) -> tuple[list[Example], int]:
    """Tokenized examples of a JSONL file and how many had to be truncated."""
    eos = tokenizer.eos_ids[0]
    examples, truncated = [], 0
    for number, obj in read_jsonl(path):
        prompt_text, response_text = prompt_and_response(obj, f"{path}:{number}")
        prompt = tokenizer.encode_prompt(prompt_text, chat=chat)
        response = tokenizer.encode(response_text, add_special_tokens=False) + [eos]
        if not prompt:
            raise UserError(f"{path}:{number}: the prompt is empty; PARA needs a prompt to read")
        fitted = truncate(prompt, response, max_len)
        truncated += fitted != (prompt, response)
        examples.append(Example(*fitted))
    if not examples:
        raise UserError(f"{path}: no examples (the file is empty)")
    return examples, truncated


@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, T) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, T) True on real tokens
    labels: torch.Tensor          # (B, T) the next token where it carries loss, else IGNORE
    prompt_end: torch.Tensor      # (B,) position of each example's last prompt token (PARA pools there)

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.prompt_end)))

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right padding: causal attention never lets a real token see the padding after it."""
    width = max(len(e.prompt) + len(e.response) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for row, e in enumerate(examples):
        tokens = e.prompt + e.response
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = True
        # Position t predicts token t + 1: the last prompt token predicts the first response token.
        labels[row, len(e.prompt) - 1:len(tokens) - 1] = torch.tensor(e.response)
    prompt_end = torch.tensor([len(e.prompt) - 1 for e in examples])
    return Batch(ids, mask, labels, prompt_end)
