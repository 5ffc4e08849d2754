"""The user-facing runtime: :func:`load` a checkpoint, then ``generate`` or ``chat``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..errors import ContextLengthError, Gemma4Error, ModelNotFoundError, PromptError
from .chat_template import validate_messages
from .checkpoint import check_finite_weights, load_checkpoint
from .config import ModelConfig, load_config
from .decoder import GemmaModel
from .generation import GenerationRequest, TextStream, Usage, generate_ids
from .kv_cache import DEFAULT_CHUNK, PrefixCache
from .memory import GiB, MemoryPlanError, available_memory, plan_memory, weight_bytes
from .multimodal import PreparedPrompt, collect_media, prepare_prompt
from .progress import LoadProgress, ProgressCallback
from .resolve import locate
from .sampling import SamplingParams
from .speculative import PromptLookupDrafter
from .tokenizer import Tokenizer

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
           "fp16": torch.float16, "float16": torch.float16}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def choose_device_dtype(cfg: ModelConfig, device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """bf16 on CUDA; on CPU fp32 when it fits comfortably in memory, else bf16."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Gemma4Error("device='cuda' was asked for but PyTorch sees no CUDA GPU; use device='cpu'")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise Gemma4Error(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype is None:
        if device.type == "cuda":
            dtype = torch.bfloat16
        else:
            fits = weight_bytes(cfg, "fp32") < available_memory(device) // 2
            dtype = torch.float32 if fits else torch.bfloat16
    return device, dtype


class Model:
    """A loaded model with its tokenizer, ready to ``generate`` and ``chat``."""

    def __init__(self, model_dir: Path, cfg: ModelConfig, net: GemmaModel, tokenizer: Tokenizer,
                 generation_config: dict, max_context: int, source: Path | None = None, *,
                 kv_dtype: str | None = None, kv_chunk: int = DEFAULT_CHUNK, prefill_chunk: int | None = None,
                 kv_offload_after: int | None = None, drafter=None, quant: str | None = None,
                 projector: Path | None = None, weight_note: str = "", name: str | None = None) -> None:
        self.quant = quant
        self.projector = projector  # a GGUF's mmproj file (vision, audio), when one was found
        self.weight_note = weight_note  # what load() chose for the weights and why (one line; "" when told)
        self.model_dir = model_dir
        self.source = source or model_dir  # what the user pointed at (a GGUF is converted to model_dir)
        self.name = name or self.source.name  # "ollama:gemma4:12b" for a store's model, else the file or folder
        self.config = cfg
        self.net = net
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.max_context = max_context
        self.default_sampling = SamplingParams.from_generation_config(generation_config)
        eos = set(cfg.eos_token_ids)
        gen_eos = generation_config.get("eos_token_id")
        eos.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
        self.stop_token_ids = frozenset(eos)
        self.last_usage: Usage | None = None
        self.kv_dtype, self.kv_chunk = kv_dtype, kv_chunk
        self.prefill_chunk = prefill_chunk or (2048 if net.device.type == "cuda" else 512)
        self.drafter = drafter  # speculative decoding: an MTPDrafter, a PromptLookupDrafter, or None
        self.cache = PrefixCache(lambda: net.new_cache(chunk=kv_chunk, kv_dtype=kv_dtype, offload_after=kv_offload_after))

    def save_quantized(self, out_dir) -> Path:
        """Write this model's quantized weights with its config and tokenizer to ``out_dir``;
        ``load(out_dir)`` then loads them without quantizing again."""
        from .quant import save_quantized

        if not self.quant:
            raise Gemma4Error("this model is not quantized: load it with quant='int8' or quant='int4' first")
        return save_quantized(self.net.weights, self.quant, self.model_dir, Path(out_dir))

    def reset(self) -> None:
        """Drop the KV cache (it is rebuilt on the next request)."""
        self.cache.clear()

    def memory_plan(self, context: int):
        dtype = _DTYPE_NAMES[self.net.dtype]
        return plan_memory(self.config, context=context, weights=self.quant or dtype, kv=self.kv_dtype or dtype,
                           compute=dtype, chunk=self.kv_chunk, prefill_chunk=self.prefill_chunk,
                           device=self.net.device.type)

    def check_memory(self, req: GenerationRequest) -> None:
        """Refuse a request whose KV cache and activations will not fit, before allocating them."""
        context = min(len(req.prompt_ids) + req.max_new_tokens, self.max_context)
        plan = self.memory_plan(context)
        held = self.cache.kv.memory()["pool_allocated"] if self.cache.kv is not None else 0
        need = plan.kv + plan.activations - held
        free = available_memory(self.net.device)
        if need > free:
            raise MemoryPlanError(
                f"this request needs about {need / GiB:.2f} GiB more memory ({len(req.prompt_ids)} prompt tokens + "
                f"{req.max_new_tokens} new: KV cache {plan.kv / GiB:.2f} GiB, activations {plan.activations / GiB:.2f} GiB) "
                f"but only {free / GiB:.2f} GiB is available on {self.net.device}. Shorten the prompt or "
                f"max_new_tokens, or load with kv_dtype='int8'."
            )

    def __repr__(self) -> str:
        cfg = self.config
        weights = f"{self.quant} weights, " if self.quant else ""
        return (f"<gemma4_nb.Model {self.name}: {cfg.model_type}, {cfg.num_layers} layers, "
                f"{cfg.parameter_count() / 1e9:.2f}B params, {weights}{self.net.dtype}, {self.net.device}>")

    # -- prompts ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of a raw prompt, starting with BOS as Gemma expects."""
        ids = self.tokenizer.encode(text, add_special_tokens=True)
        bos = self.config.bos_token_id
        if text and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def chat_prompt(self, messages: list[dict], *, enable_thinking: bool = False, tools=None) -> str:
        return self.tokenizer.render_chat(messages, add_generation_prompt=True,
                                          enable_thinking=enable_thinking, tools=tools)

    def chat_ids(self, messages: list[dict], **kwargs) -> list[int]:
        return self.tokenizer.encode(self.chat_prompt(messages, **kwargs), add_special_tokens=False)

    # -- generation ---------------------------------------------------------------------------

    def request(self, prompt_ids: list[int], max_new_tokens: int, stop: str | Iterable[str] | None = None,
                prompt: PreparedPrompt | None = None, should_stop=None, **sampling) -> GenerationRequest:
        """A checked generation request (token ids in range, sampling over the model's defaults).
        ``should_stop``: a callable asked between prefill chunks and before every decode step;
        True ends the generation there."""
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not isinstance(s, str) for s in stops):
            raise PromptError(f"stop must be a string or a list of strings, got {stop!r:.80}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r}")
        vocab = self.config.vocab_size
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise PromptError(f"token ids must be integers in [0, {vocab}); got {bad[:5]}")
        return GenerationRequest(
            prompt_ids=list(prompt_ids),
            max_new_tokens=max_new_tokens,
            sampling=self.default_sampling.updated(**sampling),
            stop_token_ids=self.stop_token_ids,
            stop_strings=tuple(s for s in stops if s),
            prompt=prompt,
            should_stop=should_stop,
        )

    def drafter_for(self, draft: bool | None):
        """The drafter a request uses: on by default when the model has one; ``draft=False`` turns it off."""
        return self.drafter if draft is not False else None

    def warm(self, prompt_ids: list[int], should_stop=None, chunk: int = 64) -> int:
        """Prefill ``prompt_ids`` into the prefix cache without generating: what a next request is
        known to start with, computed while the user is still typing it. ``should_stop`` is asked
        between chunks of ``chunk`` tokens (small, so a request or a cell that starts waits for
        little). Returns how many leading positions of ``prompt_ids`` the cache now holds."""
        from .generation import prefill

        if not prompt_ids or len(prompt_ids) >= self.max_context:
            return 0
        start = self.cache.prepare(list(prompt_ids) + [-1])  # keeps the shared prefix, all of it
        prefill(self.net, list(prompt_ids), self.cache, chunk, start=start, should_stop=should_stop, logits=False)
        return self.cache.kv.length if self.cache.kv is not None else 0

    def stream(self, req: GenerationRequest, draft: bool | None = None) -> TextStream:
        """Text deltas of ``req`` as they are generated (memory checked first; ``last_usage`` is
        this request's usage from now on)."""
        self.check_memory(req)
        text_stream = TextStream(self.net, self.tokenizer, req, self.max_context, prefix=self.cache,
                                 prefill_chunk=self.prefill_chunk, drafter=self.drafter_for(draft))
        self.last_usage = text_stream.usage
        return text_stream

    def token_ids(self, req: GenerationRequest, usage: Usage, draft: bool | None = None) -> Iterator[int]:
        """Generated token ids of ``req`` one by one, special tokens included (for readers that
        parse tool calls or thought channels); ``usage`` is filled as they come."""
        self.check_memory(req)
        self.last_usage = usage
        return generate_ids(self.net, req, self.max_context, usage, prefix=self.cache,
                            prefill_chunk=self.prefill_chunk, drafter=self.drafter_for(draft))

    def _run(self, req: GenerationRequest, stream: bool, draft: bool | None = None):
        text_stream = self.stream(req, draft)
        if stream:
            return text_stream
        for _ in text_stream:
            pass
        return text_stream.text

    def generate(self, prompt: str | list[int], *, max_new_tokens: int = 256, stream: bool = False,
                 stop: str | Iterable[str] | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 seed: int | None = None, draft: bool | None = None):
        """Continue a raw prompt (text or token ids). Returns the text, or a stream of deltas.
        ``draft=False`` turns speculative drafting off for this call."""
        if isinstance(prompt, str) and not prompt.strip():
            raise PromptError("the prompt is empty: give some text to continue")
        if not isinstance(prompt, (str, list, tuple)):
            raise PromptError(f"the prompt must be text or a list of token ids, got {type(prompt).__name__}")
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        req = self.request(ids, max_new_tokens, stop, temperature=temperature, top_k=top_k,
                            top_p=top_p, min_p=min_p, seed=seed)
        return self._run(req, stream, draft)

    def chat(self, messages: list[dict], *, max_new_tokens: int = 512, stream: bool = False,
             enable_thinking: bool = False, tools=None, stop: str | Iterable[str] | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, seed: int | None = None, draft: bool | None = None):
        """Answer a conversation rendered with the checkpoint's chat template."""
        messages = validate_messages(messages)
        if not any(_has_content(m) for m in messages):
            raise PromptError("the messages are empty: give at least one message with some content")
        prompt = self.prepare_chat(messages, enable_thinking=enable_thinking, tools=tools)
        req = self.request(prompt.ids, max_new_tokens, stop, prompt=prompt if prompt.soft_mask is not None else None,
                            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
        return self._run(req, stream, draft)

    def prepare_chat(self, messages: list[dict], **kwargs) -> PreparedPrompt:
        """The rendered, tokenized conversation with its images and audio embedded."""
        images, audios = collect_media(messages)
        text = self.chat_prompt(messages, **kwargs)
        return prepare_prompt(text, images, audios, self.tokenizer, self.config, self.net.embedders,
                              self.net.dtype, self.net.device)


def _has_content(message: dict) -> bool:
    content = message.get("content")
    if isinstance(content, str):
        return bool(content.strip())
    return bool(content) or bool(message.get("tool_calls"))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Gemma4Error(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _out_of_memory_refused(fn):
    """A MemoryError that escapes the memory plan (a limit the probe cannot see, memory taken by
    something else meanwhile) still ends as a MemoryPlanError with the numbers, not a traceback."""
    import functools

    @functools.wraps(fn)
    def load_within_memory(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MemoryError:
            raise MemoryPlanError(
                f"ran out of memory while loading the model ({available_memory('cpu') / GiB:.1f} GiB is available "
                "to this process now); free memory, raise the process's memory limit, or use a smaller model or "
                "quant='int4'") from None

    return load_within_memory


@_out_of_memory_refused
def load(model: str | os.PathLike | None = None, *, dtype=None, device=None, max_context: int | None = None,
         progress: bool = True, download: bool = False, kv_dtype: str | None = None,
         kv_chunk: int = DEFAULT_CHUNK, prefill_chunk: int | None = None,
         kv_offload_after: int | None = None, drafting: str | None = "auto",
         assistant: str | os.PathLike | None = None, quant: str | None = None,
         on_progress: ProgressCallback | None = None) -> Model:
    """Load a Gemma checkpoint: a directory, a ``.gguf`` file, a repo id in the local HF cache, a
    model in Ollama's store (``"ollama:gemma4:12b"``) or LM Studio's (``"lmstudio:<publisher>/<repo>"``,
    or a bare ``<publisher>/<repo>`` not in the HF cache), or ``$GEMMA4_NB_MODEL``; with none of
    these, the embedded Gemma 3 270M.

    ``dtype``: ``"bf16"`` or ``"fp32"`` (default: bf16 on CUDA, fp32 on CPU when it fits).
    ``max_context``: the longest prompt plus reply to allow (default: the model's maximum).
    ``download=True`` fetches a repo id from the Hugging Face Hub when it is not cached.
    ``kv_dtype="int8"`` halves the KV cache; ``kv_chunk`` is its chunk size in positions;
    ``prefill_chunk`` how many prompt tokens run per forward (default 512 on CPU, 2048 on CUDA).
    ``kv_offload_after=N`` (CUDA): full-layer KV older than the newest N positions moves to pinned
    host memory, trading PCIe transfers per token for GPU memory.
    ``drafting`` (speculative decoding; the output is unchanged): ``"auto"`` (the default) uses
    Gemma 4's MTP assistant when one is found -- ``assistant``, ``$GEMMA4_NB_ASSISTANT``, an
    ``assistant/`` folder or a ``<name>-assistant`` directory next to the model, or
    ``<repo>-assistant`` in the Hugging Face cache -- and prompt lookup otherwise (its draft length
    follows measured costs and pauses where drafts do not pay); ``"mtp"`` requires the assistant;
    ``"prompt_lookup"``; or None (off).
    ``assistant``: the MTP drafter's directory or repo id.
    ``quant``: ``"auto"`` (the default, unless ``$GEMMA4_NB_QUANT`` says otherwise) picks bf16, int8 or
    int4 from the device's free memory and the planned KV cache and says what it chose in one line
    (see :mod:`.weight_choice`; a GGUF keeps its own format, an explicit ``dtype`` means unquantized);
    ``"bf16"`` unquantized bf16 weights; ``"int8"`` or ``"int4"`` (groups of 32 weights, see docs/kernels.md),
    quantized while the checkpoint streams in (on the CPU, where fused numba kernels run them; with
    ``device="cuda"`` they then move to the GPU, where a fused Triton kernel runs them). A directory
    written by :meth:`Model.save_quantized` loads as saved, without quantizing again. A ``.gguf``
    keeps its own format by default (Q4_K_M/Q4_0 as int4, Q8_0/Q6_K as int8, F16/F32 unquantized;
    repacked once and cached, docs/gguf.md); ``quant="fp32"`` or ``"bf16"`` dequantizes it. The MTP
    assistant, when used, is int8 beside quantized weights on the CPU, else in the activation dtype.
    ``progress`` shows a bar per stage of the load on the terminal; ``on_progress(stage, done, total)``
    is called as each stage's work is done (a GGUF's repack in bytes, the weights in tensors; see
    :mod:`.progress`), e.g. for a notebook's status line.
    """
    from . import quant as qmod
    from .local_stores import is_gguf
    from .weight_choice import choose_weights, quant_setting

    setting, _ = quant_setting(quant)  # a misspelt format is refused before anything is read
    reporter = LoadProgress(show=progress, callback=on_progress)
    located = locate(model, download=download)
    model_dir = source = located.path
    gguf = is_gguf(source)
    if gguf:  # repacked in its own format (or the one asked for) once, or read as it is
        from .gguf_file import prepare_gguf

        model_dir = prepare_gguf(model_dir, setting if setting in qmod.QUANT_FORMATS else None,
                                 plain=setting in qmod.UNQUANTIZED, progress=reporter)
    cfg = load_config(model_dir)
    limit = cfg.max_position_embeddings
    if max_context is None:
        max_context = limit
    if not 1 < max_context <= limit:
        raise ContextLengthError(
            f"max_context={max_context} is outside what this model supports (2 to {limit} tokens)"
        )
    saved_quant = qmod.is_quantized_dir(model_dir)
    # the tokenizer (0.4 GiB for a 262,144-token vocabulary) is read after the memory check below,
    # unless a GGUF's projector needs its media token ids first
    tokenizer = None
    text_cfg = cfg  # what the weight files hold; `cfg` gains a GGUF's projector (mmproj) for images and audio
    projector = None
    if gguf and cfg.family.name == "gemma4":
        from .gguf_projector import attach_projector

        tokenizer = Tokenizer(model_dir)

        shown = located.ref if located.store in ("ollama", "lmstudio") else source.name
        projector, media_note = attach_projector(located.projector, cfg, tokenizer.token_id)
        cfg = projector.config_for(cfg) if projector else _with_media_note(cfg, media_note)
        if projector is None and located.projector is not None and progress:
            print(f"gemma4-nb: {shown}: images and audio are off: {media_note}", file=sys.stderr, flush=True)
    choice = choose_weights(cfg, quant=quant, device=device, dtype=dtype, max_context=max_context,
                            stored="gguf" if gguf else qmod.read_marker(model_dir)["format"] if saved_quant else None,
                            probe=available_memory)
    quant, device, dtype = qmod.check_quant(choice.quant), choice.device, choice.dtype
    if choice.note and progress:
        print(choice.note, file=sys.stderr, flush=True)
    if (quant or saved_quant) and device is None:
        device = "cpu"  # quantized weights default to the CPU (fused numba kernels); CUDA only when asked for
    if (quant or saved_quant) and device is not None and torch.device(device).type not in ("cpu", "cuda"):
        raise Gemma4Error(f"quantized weights run on the CPU or a CUDA GPU; load with device='cpu' or 'cuda', "
                          f"or without quant on {device}")
    if (quant or saved_quant) and dtype is None and torch.device(device).type == "cpu":
        dtype = torch.float32  # activations; the weights are small (bf16 on CUDA)
    device, dtype = choose_device_dtype(cfg, device, dtype)
    if kv_dtype not in (None, "int8"):
        raise Gemma4Error(f"kv_dtype {kv_dtype!r} is not supported: use None (the model dtype) or 'int8'")
    fmt = quant or (saved_quant and qmod.read_marker(model_dir)["format"]) or _DTYPE_NAMES[dtype]
    need = weight_bytes(cfg, fmt, rest=_DTYPE_NAMES[dtype], device=torch.device(device).type)
    free = available_memory(device)
    if need > free:
        raise MemoryPlanError(
            f"{cfg.model_type} weights need {need / GiB:.1f} GiB in {fmt} but only {free / GiB:.1f} GiB is "
            f"available on {device}; free memory, use dtype='bf16', or a smaller model"
        )
    tokenizer = tokenizer or Tokenizer(model_dir)
    assistant_dir = _assistant_dir(drafting, assistant, model_dir, cfg, download, source)
    if saved_quant:
        weights = qmod.load_saved_quantized(text_cfg, model_dir, dtype, quant, progress=reporter)
        check_finite_weights(weights, model_dir)
        quant = qmod.read_marker(model_dir)["format"]
    elif quant:
        from .checkpoint import check_checkpoint, expected_tensors, find_shards

        shards = find_shards(model_dir)
        check_checkpoint(cfg, shards)
        weights = qmod.load_quantized_from_shards(cfg, shards, list(expected_tensors(cfg)), quant, dtype, reporter)
    elif gguf:
        from .gguf_file import GGUFFile
        from .gguf_weights import plain_weights

        weights = {k: t.to(device) for k, t in plain_weights(GGUFFile(source), text_cfg, dtype, reporter).items()}
    else:
        weights = load_checkpoint(cfg, model_dir, dtype, device, progress=reporter)
    if quant and device.type != "cpu":
        # quantized while streaming on the CPU; codes and scales then move to the GPU (kernels/gpu.py),
        # a head saved in nibble planes (a repacked GGUF) as plain int8
        from ..kernels.qweight import QWeight

        weights = {name: (QWeight("int8", t.int8_codes(), t.scales, None, t.shape, t.dtype)
                          if getattr(t, "planes", False) else t).to(device) for name, t in weights.items()}
    if projector is not None:
        try:
            weights.update(projector.weights(dtype, device))
        except Gemma4Error as exc:  # a damaged projector: the text model still works
            cfg = _with_media_note(text_cfg, f"its projector cannot be used: {exc}")
            if progress:
                print(f"gemma4-nb: {shown}: images and audio are off: {exc}", file=sys.stderr, flush=True)
    drafter = None
    if assistant_dir is not None:
        from .mtp import load_assistant

        # with quantized weights on the CPU the drafter is int8 too (it stays in the activation dtype on a GPU)
        draft_quant = "int8" if quant and device.type == "cpu" else None
        if assistant_dir.suffix == ".gguf":  # llama.cpp's gemma4-assistant file
            from .gguf_assistant import load_gguf_assistant

            drafter = load_gguf_assistant(assistant_dir, cfg, dtype, device, quant=draft_quant)
        else:
            drafter = load_assistant(assistant_dir, cfg, dtype, device, progress=reporter, quant=draft_quant)
    elif drafting in ("auto", "prompt_lookup"):
        drafter = PromptLookupDrafter()
    generation_config = _read_json(model_dir / "generation_config.json")
    return Model(model_dir, cfg, GemmaModel(cfg, weights), tokenizer, generation_config, max_context, source,
                 kv_dtype=kv_dtype, kv_chunk=kv_chunk, prefill_chunk=prefill_chunk,
                 kv_offload_after=kv_offload_after, drafter=drafter, quant=quant, projector=located.projector,
                 weight_note=choice.note, name=located.ref if located.store in ("ollama", "lmstudio") else None)


def _with_media_note(cfg: ModelConfig, note: str) -> ModelConfig:
    """``cfg`` with the reason images and audio are off, which a request with media is told."""
    import dataclasses

    return dataclasses.replace(cfg, raw=cfg.raw | {"gemma4_nb_media_note": note})


DRAFTING = ("auto", "mtp", "prompt_lookup", None)


def _assistant_dir(drafting, assistant, model_dir: Path, cfg: ModelConfig, download: bool,
                   source: Path | None = None) -> Path | None:
    """Where the MTP assistant to load is (a directory, or a ``gemma4-assistant`` GGUF), or None
    (checked before the target's weights load)."""
    from .mtp import find_assistant, resolve_assistant

    if drafting not in DRAFTING:
        raise Gemma4Error(f"drafting {drafting!r} is not supported: use 'auto', 'mtp', 'prompt_lookup' or None")
    if drafting not in ("auto", "mtp"):
        return None
    if assistant is not None and str(assistant).endswith(".gguf") and Path(assistant).expanduser().is_file():
        return Path(assistant).expanduser().resolve()
    if assistant is not None:
        return resolve_assistant(assistant, download=download)
    found = find_assistant(model_dir) if cfg.family.name == "gemma4" else None
    if found is None and cfg.family.name == "gemma4" and source is not None and source.suffix == ".gguf":
        from .gguf_assistant import find_assistant_gguf

        found = find_assistant_gguf(source)
    if found is None and drafting == "mtp":
        raise ModelNotFoundError(
            f"drafting='mtp' needs the model's MTP assistant, and none was found next to {model_dir}: pass "
            "assistant=<directory or repo id> (for google/gemma-4-12B-it: google/gemma-4-12B-it-assistant), "
            "set $GEMMA4_NB_ASSISTANT, or use drafting='auto'."
        )
    return found
