"""The generation loop: prefill, decode, stop conditions, streaming text and usage figures."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..errors import ContextLengthError, PromptError
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the previous request's cache
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str | None = None  # "eos", "stop_string", "length", "interrupted" (Stop, Ctrl-C)
    drafting: object | None = None  # speculative.DraftStats when drafting was on

    @property
    def prefill_tokens_per_second(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # the first generated token comes from the prefill; the rest from decode steps
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def time_to_first_token(self) -> float:
        return self.prefill_seconds

    def summary(self) -> str:
        reused = f" ({self.cached_tokens} reused)" if self.cached_tokens else ""
        d = self.drafting
        drafted = (f" | drafts accepted {d.accepted}/{d.proposed}, {d.mean_accepted_length:.2f} tokens/forward"
                   if d is not None and d.proposed else "")
        if drafted and d.speedup is not None:
            drafted += f", ~{d.speedup:.2f}x this run's plain steps"
        return (
            f"prompt {self.prompt_tokens} tokens{reused}, generated {self.generated_tokens} tokens | "
            f"prefill {self.prefill_tokens_per_second:.1f} tok/s, decode {self.decode_tokens_per_second:.1f} tok/s"
            f" | finish: {self.finish_reason}{drafted}"
        )


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    prompt: object | None = None  # a multimodal.PreparedPrompt when the prompt holds media
    # asked between prefill chunks and before every decode step, hidden tokens included: True ends
    # the generation there (finish_reason "interrupted"); a chat panel's Stop button sets it
    should_stop: Callable[[], bool] | None = None


def check_request(req: GenerationRequest, context_length: int) -> int:
    """Validate a request; return how many tokens may be generated."""
    n = len(req.prompt_ids)
    if n == 0:
        raise PromptError("the prompt is empty: give some text to continue or a user message")
    if n >= context_length:
        raise ContextLengthError(
            f"the prompt has {n} tokens but the context holds {context_length} "
            f"(no room for a reply); shorten the prompt or load the model with a longer max_context"
        )
    if isinstance(req.max_new_tokens, bool) or not isinstance(req.max_new_tokens, int) or req.max_new_tokens < 1:
        raise PromptError(f"max_new_tokens must be a whole number of at least 1, got {req.max_new_tokens!r}")
    return min(req.max_new_tokens, context_length - n)


def prefill(model, ids: list[int], prefix, chunk: int, start: int = 0, prompt=None, should_stop=None,
            logits: bool = True):
    """Run ``ids[start:]`` through the model ``chunk`` tokens at a time (bounded activation
    memory); logits only for the last position (none without ``logits``). A chunk never splits an
    image (its tokens attend to each other both ways). Each finished chunk is recorded in
    ``prefix`` at once, so an interrupted prefill leaves a consistent, reusable cache. Returns
    None when ``should_stop()`` said so before a chunk."""
    from .decoder import SoftTokens

    keys = prompt.keys if prompt is not None else ids
    atomic = prompt.atomic if prompt is not None else ()
    out, pos = None, start
    while pos < len(ids):
        if should_stop is not None and should_stop():
            return None
        end = min(pos + chunk, len(ids))
        for a, b in atomic:
            if a < end < b:
                end = a if a > pos else b
        soft = None
        if prompt is not None:
            mask, embeddings, blocks = prompt.span_soft(pos, end)
            if mask is not None and bool(mask.any()):
                soft = SoftTokens(mask, embeddings, blocks)
        out = model.forward(torch.tensor(ids[pos:end], dtype=torch.long), prefix.kv, soft=soft,
                            logits=logits and end == len(ids))
        prefix.appended(keys[pos:end])
        pos = end
    return out


def _next_token(model, token: int, prefix, sampler: Sampler) -> int:
    """One decode step. With quantized weights on the CPU, greedy decoding and top-k sampling take
    the k best logits straight from the fused head (the vocabulary's logits are never all
    computed); otherwise the sampler sees every logit."""
    k = sampler.head_k() if getattr(model, "fused", False) else None
    out = model.forward(torch.tensor([token], dtype=torch.long), prefix.kv, logits=k is None)
    prefix.appended([token])
    if k is None:
        return sampler(out.logits[-1])
    return sampler.pick(*model.top_k(out.hidden[-1], k))


def generate_ids(model, req: GenerationRequest, context_length: int, usage: Usage, *,
                 prefix=None, prefill_chunk: int = 512, drafter=None, draft_k: int = 4) -> Iterator[int]:
    """Yield generated token ids one by one (stop tokens are not yielded); fills ``usage``.

    ``prefix`` (a :class:`~gemma4_nb.runtime.kv_cache.PrefixCache`) keeps the cache between requests so a
    shared prompt prefix is not recomputed; without it a fresh cache is used.
    """
    from .kv_cache import PrefixCache

    budget = check_request(req, context_length)
    sampler = Sampler(req.sampling)
    prefix = prefix or PrefixCache(model.new_cache)
    usage.prompt_tokens = len(req.prompt_ids)
    t0 = time.perf_counter()
    if req.prompt is not None:
        usage.cached_tokens = prefix.prepare(req.prompt.keys, req.prompt.atomic)
    else:
        usage.cached_tokens = prefix.prepare(req.prompt_ids)
    stop = req.should_stop
    out = prefill(model, req.prompt_ids, prefix, prefill_chunk, start=usage.cached_tokens, prompt=req.prompt,
                  should_stop=stop)
    if out is None:
        usage.prefill_seconds = time.perf_counter() - t0
        usage.finish_reason = "interrupted"
        return
    token = sampler(out.logits[-1])
    usage.prefill_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    try:
        if drafter is not None:
            yield from _speculative(model, req, usage, prefix, sampler, token, out.hidden[-1], budget, drafter, draft_k)
            return
        for step in range(budget):
            if token in req.stop_token_ids:
                usage.finish_reason = "eos"
                return
            usage.generated_tokens += 1
            yield token
            if step + 1 == budget:
                break
            if stop is not None and stop():
                usage.finish_reason = "interrupted"
                return
            token = _next_token(model, token, prefix, sampler)
        usage.finish_reason = "length"
    except KeyboardInterrupt:
        usage.finish_reason = "interrupted"
        raise
    finally:
        usage.decode_seconds = time.perf_counter() - t1


def _speculative(model, req, usage, prefix, sampler, token, hidden, budget, drafter, draft_k):
    """Decode with drafts verified in one forward each (see gemma4_nb.runtime.speculative).

    ``hidden`` is the model's final hidden state at the last committed position: the MTP drafter
    starts from it (with the KV cache), prompt lookup ignores it."""
    from .speculative import AdaptiveK, CostAwareK, DraftContext, DraftStats, accept_or_resample

    # Draft lengths follow measured costs when drafting costs real time (the MTP assistant) or when
    # a plain step is much cheaper than a verification: with quantized weights on the CPU a plain
    # step takes its tokens from the fused head (the top-k, never every logit) while a verification
    # needs every logit of every position, so prompt lookup pays only when enough drafts land.
    stats = DraftStats()
    fused = getattr(model, "fused", False)
    plain_k = sampler.head_k() if fused else None
    k = CostAwareK(draft_k) if (drafter.cost_aware or fused) else AdaptiveK(draft_k)
    usage.drafting = stats
    history = list(req.prompt_ids)
    # while drafting is paused, a free drafter's proposals are checked against the plain steps
    shadowing = isinstance(k, CostAwareK) and not drafter.cost_aware
    shadow, shadow_hits = None, 0

    def emit(tok: int):
        """Yield ``tok`` unless it stops the generation; return True when generation ends."""
        if tok in req.stop_token_ids:
            usage.finish_reason = "eos"
            return True
        usage.generated_tokens += 1
        history.append(tok)
        yield tok
        if usage.generated_tokens >= budget:
            usage.finish_reason = "length"
            return True
        return False

    while True:
        if (yield from emit(token)):
            return
        if req.should_stop is not None and req.should_stop():
            usage.finish_reason = "interrupted"
            return
        t_draft = time.perf_counter()
        drafts = drafter.propose(history, min(k.k, budget - usage.generated_tokens),
                                 DraftContext(model, prefix.kv, hidden))
        t_verify = time.perf_counter()
        if shadowing and k.k == 0 and shadow is None:  # paused: propose anyway, verify against plain steps
            shadow, shadow_hits = drafter.propose(history, k.k_max), 0
        if not drafts and plain_k is not None:  # a plain step, as generate_ids takes it
            out = model.forward(torch.tensor([token], dtype=torch.long), prefix.kv, logits=False)
            prefix.appended([token])
            hidden = out.hidden[-1]
            token = sampler.pick(*model.top_k(hidden, plain_k))
            # the step's cost includes its head, as a verification's does
            stats.record(0, 0, t_verify - t_draft, time.perf_counter() - t_verify)
            k.update(0, 0, t_verify - t_draft, time.perf_counter() - t_verify)
            if shadow is not None:  # the round ends at the first miss or when every draft came true
                hit = bool(shadow) and token == shadow[shadow_hits]
                shadow_hits += hit
                if not hit or shadow_hits == len(shadow):
                    k.shadow(len(shadow), shadow_hits)
                    shadow = None
            continue
        shadow = None
        start = prefix.kv.length
        fed = [token] + drafts
        out = model.forward(torch.tensor(fed, dtype=torch.long), prefix.kv, outputs="all" if drafts else "last",
                            logits=plain_k is None)
        prefix.appended(fed)
        if plain_k is not None:  # the k best logits of every position, each head row read once for all
            top_vals, top_ids = model.top_k_rows(out.hidden, plain_k)
        t_done = time.perf_counter()
        accepted, nxt = 0, None
        for i, d in enumerate(drafts):
            if sampler.params.greedy:
                choice = int(top_ids[i, 0]) if plain_k is not None else int(torch.argmax(out.logits[i]))
                ok = choice == d
            else:
                logits = out.logits[i] if plain_k is None else \
                    _sparse_logits(top_vals[i], top_ids[i], model.cfg.vocab_size)
                ok, choice = accept_or_resample(logits, d, sampler.params, sampler.generator)
            if not ok:
                nxt = choice
                break
            accepted += 1
        stats.record(len(drafts), accepted, t_verify - t_draft, t_done - t_verify)
        k.update(len(drafts), accepted, t_verify - t_draft, time.perf_counter() - t_verify)
        if accepted < len(drafts):
            prefix.truncate(start + 1 + accepted)  # forget the rejected drafts
        for d in drafts[:accepted]:
            if (yield from emit(d)):
                return
        # the position whose logits chose the next token is the last one kept
        last = accepted if drafts else -1
        hidden = out.hidden[last]
        if nxt is not None:
            token = nxt
        elif plain_k is not None:
            token = sampler.pick(top_vals[last], top_ids[last])
        else:
            token = sampler(out.logits[last])


def _sparse_logits(values: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Logits over the whole vocabulary that hold ``values`` at ``ids`` and minus infinity elsewhere:
    under a top-k filter of the same k, the distribution of the full logits."""
    logits = torch.full((vocab,), float("-inf"))
    logits[ids] = values.float()
    return logits


class TextStream:
    """Iterator of text deltas for one generation; ``text``, ``token_ids`` and ``usage`` when done.

    Stop strings are honoured across token boundaries: text that could begin a stop string is
    held back until it is known not to.
    """

    def __init__(self, model, tokenizer: Tokenizer, req: GenerationRequest, context_length: int, **kw) -> None:
        self.usage = Usage()
        self.token_ids: list[int] = []
        self.text = ""
        self._req = req
        check_request(req, context_length)  # fail now, not at first iteration
        self._ids = generate_ids(model, req, context_length, self.usage, **kw)
        self._decoder = StreamDecoder(tokenizer)
        self._iter = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._iter)

    def _stop_hit(self, text: str) -> int | None:
        hits = [i for s in self._req.stop_strings if (i := text.find(s)) >= 0]
        return min(hits) if hits else None

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self._req.stop_strings:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    best = max(best, k)
                    break
        return best

    def _run(self) -> Iterator[str]:
        pending = ""  # decoded but not yet emitted
        for token in self._ids:
            self.token_ids.append(token)
            pending += self._decoder.push(token)
            # Emitted text never ends in a stop-string prefix, so a stop starts inside `pending`.
            cut = self._stop_hit(self.text + pending) if self._req.stop_strings else None
            if cut is not None:
                pending = pending[: cut - len(self.text)]
                self._ids.close()
                self.usage.finish_reason = "stop_string"
                break
            keep = self._holdback(pending)
            emit, pending = (pending[: len(pending) - keep], pending[len(pending) - keep :]) if keep else (pending, "")
            if emit:
                self.text += emit
                yield emit
        else:
            pending += self._decoder.flush()
        if pending:
            self.text += pending
            yield pending
