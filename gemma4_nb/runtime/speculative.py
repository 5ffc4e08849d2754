"""Speculative decoding: a cheap drafter proposes tokens, the model verifies them in one forward.

Greedy verification keeps the longest agreeing prefix plus the model's own next token, so the
output is identical to plain greedy decoding. With sampling, each draft is accepted with the
target probability and a rejection resamples from the residual, so the output distribution is
exactly the target's. Rejected positions are rolled back in the KV cache.

Drafters: prompt lookup here (n-gram matches against the prompt and the notebook context in it,
which shine when code is rewritten with the same column and variable names) for every model, and
Gemma 4's MTP assistant (:mod:`gemma4_nb.runtime.mtp`) when one is installed next to the model.
Every drafter is a :class:`Drafter`; what it may read of the model is a :class:`DraftContext`.
The verify loop is in :mod:`.generation`.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .sampling import SamplingParams, filter_logits


@dataclass
class DraftContext:
    """What a drafter may read of the target after the last verification: the target network
    (a :class:`~gemma4_nb.runtime.decoder.GemmaModel`), its KV cache (positions
    ``< cache.length`` committed) and its final hidden state at the last committed position."""

    net: object
    cache: object
    hidden: torch.Tensor  # [hidden]


class Drafter(Protocol):
    """Proposes draft tokens for the target to verify."""

    # True when drafting costs real time (a model runs): the draft length then follows measured
    # costs (:class:`CostAwareK`) instead of acceptance alone
    cost_aware: bool

    def propose(self, tokens: list[int], k: int, target: DraftContext | None = None) -> list[int]:
        """Up to ``k`` tokens likely to follow ``tokens`` (the prompt and what was generated);
        ``k == 0`` means drafting is paused and must return at once."""
        ...


class PromptLookupDrafter:
    """Propose the tokens that followed the most recent earlier occurrence of the last n-gram
    (the longest of ``max_ngram`` .. ``min_ngram`` tokens that occurs earlier).

    One matching token is weak evidence (whatever followed the last ``(`` or ``,``), and a
    rejected draft costs a verification forward: with matches of 2 or more tokens the three
    code-rewriting prompts of ``bench --draft`` ran 1.45-1.57x plain decoding where 1-token
    matches gave 1.37-1.48x (the 270M, int8 and int4, docs/benchmarks.md)."""

    cost_aware = False  # a lookup in a list costs next to nothing

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def __repr__(self) -> str:
        return f"<PromptLookupDrafter: {self.min_ngram}- to {self.max_ngram}-gram matches>"

    def propose(self, tokens: list[int], k: int, target: DraftContext | None = None) -> list[int]:
        """Up to ``k`` drafts after ``tokens`` (``target``, the model's state, is not needed here)."""
        if k <= 0:  # drafting paused
            return []
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
    verify_seconds: float = 0.0  # time spent in verification forwards (with drafts)
    plain_steps: int = 0  # forwards without drafts (nothing to propose, or drafting paused)
    plain_seconds: float = 0.0

    def record(self, proposed: int, accepted: int, draft_seconds: float = 0.0, forward_seconds: float = 0.0) -> None:
        """One round: ``proposed`` drafts of which ``accepted`` were kept (0 drafts: a plain step)."""
        self.draft_seconds += draft_seconds
        if not proposed:
            self.plain_steps += 1
            self.plain_seconds += forward_seconds
            return
        self.verify_seconds += forward_seconds
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
    def speedup(self) -> float | None:
        """Tokens per second while drafting over tokens per second of this run's own plain steps
        (None when every step had drafts, so there is no plain step to compare with)."""
        if not self.plain_steps or not self.steps:
            return None
        drafting = (self.accepted + self.steps) / (self.draft_seconds + self.verify_seconds)
        return drafting * self.plain_seconds / self.plain_steps

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

    def update(self, proposed: int, accepted: int, draft_seconds: float = 0.0, verify_seconds: float = 0.0) -> None:
        if proposed and accepted == proposed:
            self.k = min(self.k + 1, self.k_max)
        elif proposed and accepted < proposed // 2:
            self.k = max(self.k - 1, self.k_min)


def expected_tokens(a: float, k: int) -> float:
    """Tokens one round yields with k drafts each accepted with probability ``a`` (independently):
    the accepted prefix plus the model's own token, ``(1 - a^(k+1)) / (1 - a)``."""
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


class CostAwareK(AdaptiveK):
    """Draft length chosen for tokens per second, from measured costs.

    A round of k drafts costs ``k * draft + verify(k + 1)`` and yields :func:`expected_tokens`.
    The per-draft acceptance is a running estimate (older rounds decay), and so is the draft step's
    time. ``verify(t)`` is the median of the last few forwards of ``t`` tokens (plain steps are
    ``t = 1``), counted from a length's second forward: the first forward of a length pays one-off
    costs (the head learning its screen, first-use allocations: 10-20x a warm one on the 270M), and
    a shared machine adds spikes that a median ignores (a minimum would favour the length measured
    most often, the plain step, by its luckiest sample). Lengths not measured yet follow the
    straight line through those that were. Each generation measures its own (``costs``, the
    samples, may be passed in): a seeded sampling run then draws the same random numbers as the
    last one with the same seed, as far as the machine's timing allows. Where a verification is bound by reading
    the weights (a GPU) its cost hardly grows with t and long drafts pay; where it is bound by
    arithmetic (a CPU with few cores) it grows with every token and short drafts win. k moves one
    step per round towards the best length, so new lengths get measured as it goes. When no length
    beats plain decoding, drafting pauses (k = 0) for ``pause`` steps, then tries k = 1 again.

    A drafter that costs nothing (prompt lookup) keeps proposing while paused, unverified: its
    proposals are scored against the tokens the plain steps produce (:meth:`shadow`), so the
    acceptance estimate follows the text and drafting resumes as soon as the text starts copying
    (a rewrite that diverges for a line, then repeats its input, is the usual case).
    """

    SAMPLES = 9  # forwards per length the median is taken over

    def __init__(self, k: int = 4, k_min: int = 1, k_max: int = 8, decay: float = 0.95, pause: int = 32,
                 costs: dict[int, deque] | None = None) -> None:
        super().__init__(k, k_min, k_max)
        self.decay, self.pause = decay, pause
        self.accepted = self.rejected = 0.0
        self.draft_cost = None  # seconds per draft step
        # tokens -> the last warm forwards' seconds (empty: only the first, cold one so far)
        self.costs = {} if costs is None else costs
        self._paused = 0

    def acceptance(self) -> float:
        n = self.accepted + self.rejected
        return min(self.accepted / n, 0.99) if n else 0.5

    def verify_cost(self, tokens: int) -> float | None:
        """Seconds for a forward of ``tokens`` tokens, or None before two lengths were seen."""
        warm = {t: statistics.median(ys) for t, ys in self.costs.items() if ys}
        if tokens in warm:
            return warm[tokens]
        if len(warm) < 2:
            return None
        ts, ys = list(warm), list(warm.values())
        n, st, sy = len(ts), sum(ts), sum(ys)
        stt, sty = sum(t * t for t in ts), sum(t * y for t, y in zip(ts, ys))
        c1 = max((n * sty - st * sy) / (n * stt - st * st), 0.0)
        c0 = (sy - c1 * st) / n
        # bounds the line may not cross: a forward costs at least what a shorter one does, and at
        # least its share at the per-token cost of a longer one (which is never higher)
        shorter = [y for t, y in warm.items() if t < tokens]
        floor = max(shorter) if shorter else max(y * tokens / t for t, y in warm.items())
        return max(c0 + c1 * tokens, floor)

    def rate(self, k: int) -> float:
        """Expected tokens per second with k drafts per round (0: plain decoding)."""
        cost = k * self.draft_cost + self.verify_cost(k + 1) if k else self.verify_cost(1)
        return expected_tokens(self.acceptance(), k) / cost if cost > 0 else float("inf")

    def update(self, proposed: int, accepted: int, draft_seconds: float = 0.0, verify_seconds: float = 0.0) -> None:
        d = self.decay
        t = proposed + 1
        if t in self.costs:
            self.costs[t].append(verify_seconds)
        else:
            self.costs[t] = deque(maxlen=self.SAMPLES)  # a length's first forward is not counted
        if not proposed:  # a plain step: drafting is paused
            self._paused -= 1
            if self.k == 0 and self._paused <= 0:
                self.k = max(self.k_min, 1)
            return
        self.accepted = d * self.accepted + accepted
        self.rejected = d * self.rejected + (accepted < proposed)
        step = draft_seconds / proposed
        self.draft_cost = step if self.draft_cost is None else d * self.draft_cost + (1 - d) * step
        if self.verify_cost(1) is None or self.verify_cost(2) is None:  # no cost model yet
            super().update(proposed, accepted)
            return
        best = max(range(self.k_min, self.k_max + 1), key=self.rate)
        if self.rate(best) < self.rate(0):
            self.k, self._paused = 0, self.pause
        elif best != self.k:
            self.k += 1 if best > self.k else -1

    def shadow(self, proposed: int, accepted: int) -> None:
        """A paused round's unverified proposal of ``proposed`` drafts, of which the plain steps
        then produced the first ``accepted``: the acceptance estimate learns from it (the costs do
        not), and drafting resumes at the best length once one beats plain decoding."""
        if self.k != 0 or not proposed:
            return
        d = self.decay
        self.accepted = d * self.accepted + accepted
        self.rejected = d * self.rejected + (accepted < proposed)
        if self.draft_cost is None or self.verify_cost(1) is None or self.verify_cost(2) is None:
            if self.acceptance() >= 0.5:  # no cost model yet: measure the shortest drafts
                self.k, self._paused = max(self.k_min, 1), 0
            return
        best = max(range(self.k_min, self.k_max + 1), key=self.rate)
        if self.rate(best) > self.rate(0):
            self.k, self._paused = best, 0
