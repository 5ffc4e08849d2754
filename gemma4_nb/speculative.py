"""Speculative decoding: a cheap drafter proposes tokens, the model verifies them in one forward.

Greedy verification keeps the longest agreeing prefix plus the model's own next token, so the
output is identical to plain greedy decoding. With sampling, each draft is accepted with the
target probability and a rejection resamples from the residual, so the output distribution is
exactly the target's. Rejected positions are rolled back in the KV cache.

Drafters: prompt lookup here (n-gram matches against the prompt and the notebook context in it,
which shine when code is rewritten with the same column and variable names) for every model, and
Gemma 4's MTP assistant (:mod:`gemma4_nb.assistant`) when one is installed next to the model. A
drafter has ``propose(tokens, k, target)``; ``target`` is a
:class:`~gemma4_nb.assistant.DraftContext` (the model's hidden state and KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams, filter_logits


class PromptLookupDrafter:
    """Propose the tokens that followed the most recent earlier occurrence of the last n-gram."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def __repr__(self) -> str:
        return f"<PromptLookupDrafter: {self.min_ngram}- to {self.max_ngram}-gram matches>"

    def propose(self, tokens: list[int], k: int, target=None) -> list[int]:
        """Up to ``k`` drafts after ``tokens`` (``target``, the model's state, is not needed here)."""
        n_tokens = len(tokens)
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            for start in range(n_tokens - n - 1, -1, -1):  # most recent match first
                if tokens[start : start + n] == tail:
                    follow = tokens[start + n : start + n + k]
                    if follow:
                        return follow
        return []


@dataclass
class DraftStats:
    proposed: int = 0
    accepted: int = 0
    steps: int = 0  # verification forwards
    per_position: list[list[int]] = field(default_factory=list)  # [accepted, proposed] per draft position
    draft_seconds: float = 0.0  # time spent drafting
    verify_seconds: float = 0.0  # time spent in verification forwards

    def record(self, proposed: int, accepted: int) -> None:
        self.steps += 1
        self.proposed += proposed
        self.accepted += accepted
        while len(self.per_position) < proposed:
            self.per_position.append([0, 0])
        for i in range(proposed):
            self.per_position[i][1] += 1
            self.per_position[i][0] += int(i < accepted)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        """How often the i-th draft of a round was accepted, for i = 0, 1, ..."""
        return [a / p if p else 0.0 for a, p in self.per_position]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per verification forward (accepted drafts + the model's own token)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0


def accept_or_resample(logits: torch.Tensor, draft: int, params: SamplingParams, generator) -> tuple[bool, int]:
    """Speculative rejection sampling for a deterministic draft: accept ``draft`` with probability
    p(draft); otherwise sample from p with ``draft`` removed (the residual max(p - q, 0) for a
    one-hot q). The result is distributed exactly as p."""
    p = filter_logits(logits, params).softmax(-1).cpu()
    if torch.rand((), generator=generator).item() < float(p[draft]):
        return True, draft
    residual = p.clone()
    residual[draft] = 0.0
    total = float(residual.sum())
    if total <= 0.0:  # p was one-hot on the draft: acceptance was certain
        return True, draft
    return False, int(torch.multinomial(residual / total, 1, generator=generator))


class AdaptiveK:
    """Draft length that grows while drafts are accepted and shrinks when they are not."""

    def __init__(self, k: int = 4, k_min: int = 1, k_max: int = 8) -> None:
        self.k, self.k_min, self.k_max = k, k_min, k_max

    def update(self, proposed: int, accepted: int) -> None:
        if proposed and accepted == proposed:
            self.k = min(self.k + 1, self.k_max)
        elif proposed and accepted < proposed // 2:
            self.k = max(self.k - 1, self.k_min)
