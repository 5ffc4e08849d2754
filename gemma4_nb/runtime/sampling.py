"""Next-token selection: greedy, or sampling with temperature, top-k, top-p and min-p."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch

from ..errors import PromptError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise PromptError(f"{name} must be a finite number, got {value!r}")
        for name in ("top_k", "seed"):
            value = getattr(self, name)
            if (value is not None or name == "top_k") and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise PromptError(f"{name} must be a whole number, got {value!r}")
        if self.temperature < 0:
            raise PromptError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PromptError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise PromptError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.top_k < 0:
            raise PromptError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def updated(self, **changes) -> "SamplingParams":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_generation_config(cls, gen: dict) -> "SamplingParams":
        """The checkpoint's defaults (``generation_config.json``); greedy when it does not sample."""
        if not gen.get("do_sample", False):
            return cls()
        return cls(
            temperature=float(gen.get("temperature", 1.0)),
            top_k=int(gen.get("top_k", 0) or 0),
            top_p=float(gen.get("top_p", 1.0) or 1.0),
            min_p=float(gen.get("min_p", 0.0) or 0.0),
        )


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masking (the order transformers applies them)."""
    logits = logits.float() / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - p.top_p)
        remove_sorted[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove_sorted.scatter(-1, order, remove_sorted), float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        threshold = p.min_p * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device="cpu")
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    # sampling with a top-k filter up to this k takes the k best logits from the fused head
    HEAD_TOP_K_LIMIT = 1024

    def head_k(self) -> int | None:
        """How many of the best logits decide the next token: 1 when greedy, ``top_k`` when sampling
        with a top-k filter (up to ``HEAD_TOP_K_LIMIT``); None when every logit matters."""
        if self.params.greedy:
            return 1
        if 0 < self.params.top_k <= self.HEAD_TOP_K_LIMIT:
            return self.params.top_k
        return None

    def pick(self, values: torch.Tensor, ids: torch.Tensor) -> int:
        """The next token from the ``head_k()`` best logits (``values`` descending, token ``ids``):
        the same distribution as :meth:`__call__` on all the logits, since the top-k filter drops
        every other token before temperature, top-p and min-p apply."""
        if self.params.greedy:
            return int(ids[0])
        probs = filter_logits(values, self.params).softmax(-1).cpu()
        return int(ids[int(torch.multinomial(probs, 1, generator=self.generator))])

    def __call__(self, logits: torch.Tensor) -> int:
        """Pick the next token from 1-D ``logits``."""
        if self.params.greedy:
            return int(torch.argmax(logits))
        probs = filter_logits(logits, self.params).softmax(-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))
