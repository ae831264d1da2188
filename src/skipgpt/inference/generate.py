"""Text generation with HF `generate()`, streamed, with prefill and decode timed apart.

The model is whatever `generate()` runs on: the plain HF model (dense) or `routed.model` (the routed
layers run inside it). Timing comes from the streamer, which `generate()` hands the prompt before the
first forward and then every new token as soon as it is sampled: prefill is the time to the first new
token, decode the time from there to the last one. That is what a chat user sees, and it needs no
change to `generate()`. Each new token has been copied to the host by then, so GPU work is finished
when its time is taken.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, TextStreamer

from ..errors import ConfigError
from ..models.adapters import unwrap
from ..routing.sparsity import SparsityMeter


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """(1, T) token ids of `prompt`, as one user turn of the tokenizer's chat template when it has one
    (instruction-tuned models answer in that format) and `chat` is True, else the text as it is (where a
    special token's text, a hand-written template's <|im_start|>, is that token)."""
    if chat and getattr(tokenizer, "chat_template", None):
        # The rendered turn is tokenised as a whole, so a special token's text inside the prompt would be read as
        # that token: "<|im_end|>" would end the user's turn and the rest would read as another role's.
        special = {*tokenizer.all_special_tokens, *(t.content for t in tokenizer.added_tokens_decoder.values()
                                                    if t.special)}
        inside = sorted(t for t in special if t and t in prompt)
        if inside:
            raise ConfigError(f"the prompt holds {inside[0]!r}, a special token of this tokenizer, which would end "
                              f"or open a turn of the chat template; remove it, or give the whole text with "
                              f"--raw-prompt")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ConfigError("the prompt is empty: it has no tokens to generate from")
    return ids


class TimedStreamer(TextStreamer):
    """TextStreamer that notes when each put() arrives (the prompt, then each new token) and prints the
    text only if `echo`. With a `meter`, its totals at the first new token are kept: the prompt's share."""

    def __init__(self, tokenizer, echo: bool = True, meter: SparsityMeter | None = None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.echo = echo
        self.meter = meter
        self.times: list[float] = []
        self.prompt_totals: dict[str, torch.Tensor] | None = None

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == 2 and self.meter is not None:
            self.prompt_totals = self.meter.totals  # the meter replaces its dict on add(), never mutates it
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.echo:
            super().on_finalized_text(text, stream_end)


@dataclass
class Generation:
    """One generated reply: its new token ids and text, and how long prefill and decode took."""

    new_ids: list[int]
    text: str
    prompt_tokens: int
    prefill_s: float  # prompt forward and the first new token
    decode_s: float  # every new token after the first

    @property
    def decode_tokens(self) -> int:
        return max(len(self.new_ids) - 1, 0)

    @property
    def decode_tok_s(self) -> float:
        """New tokens per second after the first (nan if only one was generated)."""
        return self.decode_tokens / self.decode_s if self.decode_tokens and self.decode_s > 0 else float("nan")

    def speed_line(self, label: str) -> str:
        rate = f"{self.decode_tok_s:.1f} tok/s" if self.decode_tokens else "n/a"  # one new token: no decode step
        return (f"{label}: decode {rate} ({self.decode_tokens} tokens in {self.decode_s:.2f} s), "
                f"prefill {self.prompt_tokens} tokens in {self.prefill_s:.3f} s")


@torch.no_grad()
def generate(model, tokenizer, ids: torch.Tensor, max_new_tokens: int, echo: bool = False,
             meter: SparsityMeter | None = None) -> tuple[Generation, TimedStreamer]:
    """Greedy `generate()` from the (1, T) prompt `ids`, streamed to stdout when `echo`.

    Greedy, so a run is reproducible and the routed and dense replies can be compared token by token.
    Returns the reply and the streamer (its `prompt_totals` hold `meter`'s totals after the prompt)."""
    device = next(unwrap(model).parameters()).device
    ids = ids.to(device)
    streamer = TimedStreamer(tokenizer, echo=echo, meter=meter)
    # Greedy whatever the model's generation_config asks for: generate() fills every field a call leaves unset
    # from it (Qwen2-Instruct's repetition penalty, suppressed tokens, beams), so for the call it holds only the
    # special token ids. Only the argmax reply is reproducible and comparable token by token.
    hf = unwrap(model)
    own = hf.generation_config
    hf.generation_config = GenerationConfig(bos_token_id=own.bos_token_id, eos_token_id=own.eos_token_id,
                                            pad_token_id=own.pad_token_id)
    try:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, streamer=streamer)
    finally:
        hf.generation_config = own
    new = out[0, ids.shape[1]:].tolist()
    t = streamer.times
    # t[0]: prompt handed over, t[1]: first new token, t[-1]: last new token
    prefill = t[1] - t[0] if len(t) > 1 else 0.0
    decode = t[-1] - t[1] if len(t) > 2 else 0.0
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Generation(new, text, ids.shape[1], prefill, decode), streamer
