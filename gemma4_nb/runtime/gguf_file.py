"""GGUF checkpoints (llama.cpp's format): the header, the metadata as a ``config.json``, the
tokenizer rebuilt from the vocabulary, and the cache directory a GGUF loads from.

Two architectures: ``gemma3`` (the embedded 270M) and ``gemma4`` (llama.cpp's layout of Gemma 4,
as its ``convert_hf_to_gguf.py`` writes it). The first load writes a cache directory with the
config, tokenizer and templates; its weights are repacked, still quantized, into the runtime's
int8/int4 format by :mod:`.gguf_weights` (the layout :func:`~.quant.save_quantized` writes, so
later loads are memory-mapped), or, for unquantized loads, read from the GGUF itself each time.
Nothing is ever written in fp32.

The header is parsed here (a few dozen lines) because ``gguf.GGUFReader`` spends about 9 s on
this model's 262,144-entry vocabulary; block layouts, type sizes and dequantization come from the
``gguf`` package.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ..errors import CheckpointError, ConfigError

CONVERTER_VERSION = "5"  # 4: weights repacked quantized (or read from the file), Gemma 4; 5: the head in planes
SOURCE_TYPES_FILE = "gguf_tensor_types.json"  # checkpoint name -> GGUF type
GGUF_MAGIC = b"GGUF"
FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED_TYPES = FLOAT_TYPES + ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS")

# GGUF tensor name -> Hugging Face name (per block: "blk.{i}." -> "model.layers.{i}.").
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# a whole tensor name (no ".weight" in the Hugging Face name)
BLOCK_SCALARS = {"layer_output_scale": "layer_scalar"}  # Gemma 4's per-layer residual scalar
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
                  # the MTP assistant's projections (architecture gemma4-assistant)
                  "nextn.pre_projection": "pre_projection", "nextn.post_projection": "post_projection"}
# tensors whose content the config carries (Gemma 4's RoPE frequency factors: which pairs rotate)
CONFIG_TENSORS = ("rope_freqs.weight",)


ASSISTANT_ARCH = "gemma4-assistant"  # llama.cpp's name for Gemma 4's MTP assistant
PROJECTOR_ARCH = "clip"  # llama.cpp's vision/audio projector files (mmproj)


@dataclass(frozen=True)
class Architecture:
    """How one GGUF architecture maps to a Hugging Face config."""

    model_type: str
    norms_store_one_plus_w: bool  # llama.cpp's converter stores (1 + w) for these norms
    chat_template: str  # fallback when the file carries none


ARCHITECTURES = {
    "gemma3": Architecture("gemma3_text", norms_store_one_plus_w=True, chat_template="gemma3_chat_template.jinja"),
    "gemma4": Architecture("gemma4_unified_text", norms_store_one_plus_w=False,
                           chat_template="gemma4_chat_template.jinja"),
}


# -- reading ---------------------------------------------------------------------------------

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (numpy) order: the GGUF dims reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute, in bytes
    nbytes: int


class GGUFFile:
    """A parsed GGUF header over a memory-mapped file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: cannot open the GGUF file ({exc})") from None
        self._pos = 0
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, IndexError, TypeError, OverflowError) as exc:
            raise CheckpointError(
                f"{self.path}: the GGUF header is truncated or corrupt ({exc}); download the file again"
            ) from None
        size = len(self._map)
        short = [t.name for t in self.tensors.values() if t.offset + t.nbytes > size]
        if short:
            raise CheckpointError(
                f"{self.path}: the file is truncated ({size} bytes; {len(short)} tensors, e.g. {short[0]}, "
                "extend past its end); download it again"
            )

    def _read(self, fmt: str):
        value = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value[0]

    def _string(self) -> str:
        n = self._read("<Q")
        raw = self._map[self._pos : self._pos + n]
        if len(raw) != n:
            raise ValueError("string runs past the end of the file")
        self._pos += n
        return raw.decode("utf-8")

    def _value(self, vtype: int):
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self._string()
        if vtype == GGUFValueType.ARRAY:
            itype, count = GGUFValueType(self._read("<I")), self._read("<Q")
            if itype in _SCALARS:
                dtype = np.dtype(_SCALARS[itype])
                arr = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos).copy()
                self._pos += count * dtype.itemsize
                return arr
            return [self._value(itype) for _ in range(count)]
        return self._read(_SCALARS[vtype])

    def _parse(self) -> None:
        if self._map[:4] != GGUF_MAGIC:
            raise ValueError("not a GGUF file (bad magic)")
        self._pos = 4
        self.version = self._read("<I")
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = self._read("<Q"), self._read("<Q")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._read("<Q") for _ in range(self._read("<I"))]
            raw_type, offset = self._read("<I"), self._read("<Q")
            infos.append((name, dims, raw_type, offset))
        align = int(self.metadata.get("general.alignment", 32))
        if align < 1:
            raise ValueError(f"general.alignment is {align}")
        data_start = -(-self._pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, raw_type, offset in infos:
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise CheckpointError(f"{self.path}: tensor {name} has unknown GGML type id {raw_type}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims)) if dims else 1
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset, n // block * type_size)

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "?")

    def rows(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of a tensor's stored bytes as uint8 ``[rows, bytes per row]``, read
        from the file (not through the mapping: pages read this way do not stay in the resident
        set, so a repack of a 7 GB file holds one block of rows at a time)."""
        n_rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        stop = n_rows if stop is None else min(stop, n_rows)
        row_bytes = info.nbytes // n_rows
        buf = np.empty((stop - start) * row_bytes, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(info.offset + start * row_bytes)
            got = fh.readinto(memoryview(buf))
        if got != buf.nbytes:
            raise CheckpointError(f"{self.path}: tensor {info.name} is cut short; the file is truncated, download it again")
        return buf.reshape(stop - start, row_bytes)

    def by_hf_name(self) -> dict[str, TensorInfo]:
        """The tensors under their Hugging Face names."""
        return {hf: info for name, info in self.tensors.items() if (hf := hf_name(name)) is not None}

    def check_type(self, info: TensorInfo) -> str:
        name = info.qtype.name
        if name not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{self.path}: tensor {info.name} is stored as {name}, which this runtime cannot read "
                f"(supported: {', '.join(SUPPORTED_TYPES)}); use a GGUF quantized as Q4_K_M, Q4_0, Q6_K or Q8_0"
            )
        return name

    def dequantized(self, info: TensorInfo, raw: np.ndarray | None = None) -> torch.Tensor:
        """A tensor (or the rows ``raw`` holds, from :meth:`rows`) dequantized to fp32."""
        name = self.check_type(info)
        raw = self.rows(info) if raw is None else raw
        whole = len(info.shape) < 2 or raw.shape[0] == int(np.prod(info.shape[:-1]))
        shape = info.shape if whole else (raw.shape[0], info.shape[-1])  # some rows: [rows, row length]
        if name == "F32":
            return torch.from_numpy(raw.view(np.float32).reshape(shape).copy())
        if name == "F16":
            return torch.from_numpy(raw.view(np.float16).reshape(shape).astype(np.float32))
        if name == "BF16":
            return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float().reshape(shape)
        if name == "Q8_0":  # 34-byte blocks: fp16 scale, 32 int8 values
            blocks = torch.from_numpy(raw.reshape(-1, 34))
            out = torch.empty((blocks.shape[0], 32), dtype=torch.float32)
            out.copy_(blocks[:, 2:].contiguous().view(torch.int8))
            out.mul_(blocks[:, :2].contiguous().view(torch.float16).float())
            return out.reshape(shape)
        return torch.from_numpy(dequantize(raw, info.qtype)).reshape(shape)

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        """One tensor dequantized to fp32, in row-major shape."""
        try:
            return self.dequantized(info)
        except (ValueError, RuntimeError) as exc:  # a size that does not match the shape or the type
            raise CheckpointError(f"{self.path}: tensor {info.name} cannot be read ({exc}); the file is damaged") from None


def read_architecture(path: Path, max_keys: int = 64) -> str | None:
    """``general.architecture`` of a GGUF from the start of its header (writers put it first),
    without parsing the rest (a 262,144-token vocabulary takes seconds); None when the file is
    not a readable GGUF or the key is not among the first ``max_keys``."""
    try:
        with open(path, "rb") as fh:
            def read(fmt: str):
                size = struct.calcsize(fmt)
                raw = fh.read(size)
                if len(raw) != size:
                    raise ValueError("short read")
                return struct.unpack(fmt, raw)[0]

            def string() -> bytes:
                n = read("<Q")
                if n > 1 << 20:
                    raise ValueError("string too long")
                return fh.read(n)

            def skip(vtype: int) -> None:
                vtype = GGUFValueType(vtype)
                if vtype == GGUFValueType.STRING:
                    fh.seek(read("<Q"), os.SEEK_CUR)
                elif vtype == GGUFValueType.ARRAY:
                    itype, count = read("<I"), read("<Q")
                    if GGUFValueType(itype) in _SCALARS:
                        fh.seek(count * struct.calcsize(_SCALARS[GGUFValueType(itype)]), os.SEEK_CUR)
                    else:
                        for _ in range(count):
                            skip(itype)
                else:
                    fh.seek(struct.calcsize(_SCALARS[vtype]), os.SEEK_CUR)

            if fh.read(4) != GGUF_MAGIC or read("<I") not in (2, 3):
                return None
            read("<Q")
            n_kv = read("<Q")
            for _ in range(min(n_kv, max_keys)):
                key, vtype = string(), read("<I")
                if key == b"general.architecture" and vtype == GGUFValueType.STRING:
                    return string().decode("utf-8")
                skip(vtype)
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None
    return None


# -- config ----------------------------------------------------------------------------------

def gguf_config(g: GGUFFile) -> dict:
    """A Hugging Face ``config.json`` dict for the file's model."""
    arch = g.architecture
    if arch not in ARCHITECTURES:
        hint = (" (a Gemma 4 MTP assistant: put it beside its model, which finds it)" if arch == ASSISTANT_ARCH
                else " (a multimodal projector: put it beside its model)" if arch == PROJECTOR_ARCH else "")
        raise ConfigError(
            f"{g.path}: GGUF architecture {arch!r} is not supported{hint}. Supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    common, get, tokens = _common_config(g, arch)
    config = common | (_gemma3_config(g, get, common) if arch == "gemma3" else _gemma4_config(g, get, common, tokens))
    return config | {"gemma4_nb_gguf": g.path.name}  # read from a GGUF (a text model: media live in an mmproj)


def gguf_assistant_config(g: GGUFFile) -> dict:
    """The ``config.json`` dict of a Gemma 4 MTP assistant GGUF (``gemma4-assistant``, written by
    llama.cpp's converter from ``Gemma4UnifiedAssistantForCausalLM``): its decoder as the text
    config, every layer reading the target's K/V; the target's hidden size from
    ``embedding_length_out``. The converter leaves out the centroid-masked head's tensors, so
    the drafter uses its full tied head."""
    a = ASSISTANT_ARCH
    common, get, tokens = _common_config(g, a)
    text = common | _gemma4_config(g, get, common, tokens, a=a)
    text.update(model_type="gemma4_unified_text", num_kv_shared_layers=0)
    return {"model_type": "gemma4_unified_assistant", "backbone_hidden_size": get.int(f"{a}.embedding_length_out"),
            "use_ordered_embeddings": False, "text_config": text}


def _common_config(g: GGUFFile, arch: str):
    get = _MetadataReader(g)
    tokens = get.strings("tokenizer.ggml.tokens")
    common = {
        "model_type": ARCHITECTURES[arch].model_type if arch in ARCHITECTURES else None,
        "vocab_size": len(tokens),
        "hidden_size": get.int(f"{arch}.embedding_length"),
        "num_hidden_layers": get.int(f"{arch}.block_count"),
        "num_attention_heads": get.int(f"{arch}.attention.head_count"),
        "rms_norm_eps": get.float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "sliding_window": get.int(f"{arch}.attention.sliding_window", 4096),
        "final_logit_softcapping": get.float(f"{arch}.final_logit_softcapping", None),
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "pad_token_id": get.token_id("tokenizer.ggml.padding_token_id", 0, len(tokens)),
        "bos_token_id": get.token_id("tokenizer.ggml.bos_token_id", 2, len(tokens)),
        "eos_token_id": get.token_id("tokenizer.ggml.eos_token_id", 1, len(tokens)),
    }
    return common, get, tokens


def _gemma3_config(g: GGUFFile, get: "_MetadataReader", common: dict) -> dict:
    n_layers, hidden, n_heads = common["num_hidden_layers"], common["hidden_size"], common["num_attention_heads"]
    head_dim = get.int("gemma3.attention.key_length", hidden // n_heads)
    # llama.cpp's rule: the 27B model scales queries by hidden/heads, the others by head_dim
    scalar = hidden // n_heads if n_layers == 62 else head_dim
    full_rope = {"rope_type": "default", "rope_theta": get.float("gemma3.rope.freq_base", 1_000_000.0)}
    factor = get.float("gemma3.rope.scaling.factor", None)
    if factor and factor != 1.0:
        full_rope.update(rope_type="linear", factor=factor)
    return {
        "intermediate_size": get.int("gemma3.feed_forward_length"),
        "num_key_value_heads": get.int("gemma3.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "query_pre_attn_scalar": scalar,
        "sliding_window_pattern": 6,
        "max_position_embeddings": get.int("gemma3.context_length", 8192),
        "attn_logit_softcapping": get.float("gemma3.attn_logit_softcapping", None),
        "rope_parameters": {"full_attention": full_rope,
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    }


def _gemma4_config(g: GGUFFile, get: "_MetadataReader", common: dict, tokens: list, a: str = "gemma4") -> dict:
    """Gemma 4 as llama.cpp's converter writes it: per-layer arrays for the KV heads (and the MLP
    width, with double-wide MLPs), the sliding/full pattern as booleans, the head sizes of the two
    kinds of layer (``key_length`` full, ``key_length_swa`` sliding), K=V layers without
    ``attn_v``, and the full layers' partial RoPE as frequency factors (``rope_freqs``: 1 for a
    rotated pair, 1e30 for one left alone)."""
    n = common["num_hidden_layers"]
    if get.int(f"{a}.embedding_length_per_layer_input", 0, minimum=0):
        raise ConfigError(f"{g.path}: this Gemma 4 has per-layer input embeddings (E2B/E4B), which this runtime "
                          "does not run; use Gemma 4 12B (or its safetensors checkpoint)")
    if get.int(f"{a}.expert_count", 0, minimum=0):
        raise ConfigError(f"{g.path}: this Gemma 4 is a mixture of experts (26B-A4B), which this runtime does not run")
    swa = get.per_layer(f"{a}.attention.sliding_window_pattern", n, bool)
    kv = get.per_layer(f"{a}.attention.head_count_kv", n, int)
    ff = get.per_layer(f"{a}.feed_forward_length", n, int)
    n_shared = get.int(f"{a}.attention.shared_kv_layers", 0, minimum=0)
    head_dim, global_head_dim = get.int(f"{a}.attention.key_length_swa"), get.int(f"{a}.attention.key_length")
    full = [i for i in range(n) if not swa[i]]
    sliding = [i for i in range(n) if swa[i]]
    owners = range(n - n_shared)
    k_eq_v = bool(full) and all(f"blk.{i}.attn_v.weight" not in g.tensors for i in full if i in owners)
    rotated = 1.0
    if "rope_freqs.weight" in g.tensors:
        freqs = g.tensor(g.tensors["rope_freqs.weight"]).flatten()
        rotated = float((freqs < 1e3).sum()) * 2 / global_head_dim
    swa_rot = get.int(f"{a}.rope.dimension_count_swa", head_dim) / head_dim
    sliding_rope = {"rope_type": "default", "rope_theta": get.float(f"{a}.rope.freq_base_swa", 10_000.0)}
    if swa_rot < 1.0:
        sliding_rope.update(rope_type="proportional", partial_rotary_factor=swa_rot)
    double_wide = n_shared > 0 and ff[-1] == 2 * ff[0]
    if any(f != ff[0] for f in ff[: n - n_shared]) or any(f != ff[-1] for f in ff[n - n_shared:]):
        raise ConfigError(f"{g.path}: gemma4.feed_forward_length varies by layer ({sorted(set(ff))}) in a way this "
                          "runtime does not run")
    eos = [common["eos_token_id"]] + [tokens.index(t) for t in ("<turn|>", "<|tool_response>") if t in tokens]
    return {
        "intermediate_size": ff[0],
        "num_key_value_heads": kv[sliding[0]] if sliding else kv[0],
        "head_dim": head_dim,
        "global_head_dim": global_head_dim,
        "attention_k_eq_v": k_eq_v,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in swa],
        "per_layer_config": {str(i): {"head_dim": global_head_dim, "num_key_value_heads": kv[i]} for i in full},
        "num_kv_shared_layers": n_shared,
        "use_double_wide_mlp": double_wide,
        "max_position_embeddings": get.int(f"{a}.context_length", 131072),
        "rope_parameters": {
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": rotated,
                               "rope_theta": get.float(f"{a}.rope.freq_base", 1_000_000.0)},
            "sliding_attention": sliding_rope},
        "eos_token_id": eos,
    }


_MISSING = object()


class _MetadataReader:
    """Typed reads of a GGUF's metadata: a missing or ill-typed key is a :class:`ConfigError`
    that names the key, the file and what was found."""

    def __init__(self, g: GGUFFile) -> None:
        self.g, self.md = g, g.metadata

    def _value(self, key: str, default):
        value = self.md.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise ConfigError(f"{self.g.path}: the GGUF metadata has no {key!r}, which the "
                                  f"{self.g.architecture} model needs; the file is incomplete: convert or download it again")
            return default
        return value

    def _wrong(self, key: str, value, expected: str) -> ConfigError:
        shown = f"an array of {len(value)}" if isinstance(value, (list, np.ndarray)) else repr(value)[:60]
        return ConfigError(f"{self.g.path}: GGUF metadata {key!r} should be {expected}, but it is {shown}; "
                           "the file is damaged or was written by an incompatible converter")

    def int(self, key: str, default=_MISSING, minimum: int = 1):
        value = self._value(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise self._wrong(key, value, f"a whole number >= {minimum}")
        return int(value)

    def float(self, key: str, default=_MISSING):
        value = self._value(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value):
            raise self._wrong(key, value, "a finite number")
        return float(value)

    def per_layer(self, key: str, n: int, kind) -> list:
        """A per-layer value: an array of ``n`` (or one value for every layer)."""
        value = self._value(key, _MISSING)
        values = list(value) if isinstance(value, (list, np.ndarray)) else [value] * n
        if len(values) != n or not all(isinstance(v, (bool, int, np.integer, np.bool_)) for v in values):
            raise self._wrong(key, value, f"{n} per-layer values")
        return [kind(v) for v in values]

    def strings(self, key: str) -> list:
        value = self._value(key, _MISSING)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self._wrong(key, value, "a non-empty list of strings")
        return value

    def token_id(self, key: str, default: int, vocab: int) -> int:
        value = self.int(key, default, minimum=0)
        if value >= vocab:
            raise self._wrong(key, value, f"a token id below the vocabulary size {vocab}")
        return value


def hf_name(gguf_name: str) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, index, part = stem.split(".", 2)
        if part in BLOCK_SCALARS and suffix == "weight":
            return f"model.layers.{index}.{BLOCK_SCALARS[part]}"
        mapped = BLOCK_TENSORS.get(part)
        return f"model.layers.{index}.{mapped}.{suffix}" if mapped else None
    mapped = GLOBAL_TENSORS.get(stem)
    return f"{mapped}.{suffix}" if mapped else None


# -- tokenizer -------------------------------------------------------------------------------

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4
# end-of-generation tokens llama.cpp treats as control whatever type the file gives them (a
# converter may write them as normal tokens); the same here, so both tokenize alike
ALWAYS_CONTROL = frozenset({"<end_of_turn>", "<eos>", "<turn|>", "<|tool_response>"})


def gguf_tokenizer(g: GGUFFile) -> Tokenizer:
    """The file's tokenizer: Gemma 3's SentencePiece vocabulary (``llama``) or Gemma 4's BPE
    with merges (``gemma4``)."""
    model = g.metadata.get("tokenizer.ggml.model")
    if model == "gemma4":
        return _bpe_tokenizer(g)
    if model != "llama":
        raise ConfigError(f"{g.path}: tokenizer model {model!r} is not supported (llama/SentencePiece, gemma4)")
    return _spm_tokenizer(g)


def _bpe_tokenizer(g: GGUFFile) -> Tokenizer:
    """Gemma 4's byte-fallback BPE from the vocabulary and merges, as llama.cpp runs it: spaces
    become "\u2581" and the merges run over the whole text, split only at runs of newlines."""
    from tokenizers import Regex

    get = _MetadataReader(g)
    tokens = get.strings("tokenizer.ggml.tokens")
    merges = g.metadata.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m[1:] for m in merges):
        raise get._wrong("tokenizer.ggml.merges", merges, "a list of 'left right' merges")
    pairs = [tuple(m.split(" ", 1)) if not m.startswith(" ") else (m[:m.index(" ", 1)], m[m.index(" ", 1) + 1:])
             for m in merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[get.token_id("tokenizer.ggml.unknown_token_id", 3, len(tokens))]
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), behavior="isolated")
    return _finish_tokenizer(g, tok, tokens)


def _finish_tokenizer(g: GGUFFile, tok: Tokenizer, tokens: list) -> Tokenizer:
    """The decoder, the control and user-defined tokens, and BOS, as the metadata says."""
    get = _MetadataReader(g)
    md = g.metadata
    types = md.get("tokenizer.ggml.token_type", np.ones(len(tokens), dtype=np.int32))
    if not isinstance(types, np.ndarray) or types.ndim != 1 or len(types) != len(tokens):
        raise get._wrong("tokenizer.ggml.token_type", types, f"an array of {len(tokens)} token types")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL or t in ALWAYS_CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])
    if md.get("tokenizer.ggml.add_bos_token", True):
        bos_id = get.token_id("tokenizer.ggml.bos_token_id", 2, len(tokens))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos_id]} $A", pair=f"{tokens[bos_id]} $A $B", special_tokens=[(tokens[bos_id], bos_id)])
    return tok


def _spm_tokenizer(g: GGUFFile) -> Tokenizer:
    """Gemma 3's byte-fallback BPE rebuilt from the vocabulary.

    GGUF keeps no merges for Gemma 3; they follow from the vocabulary: every token that splits into
    two tokens yields a merge, ranked by the token's position in the file (earlier merges first),
    the longer left part first among splits of the same token.
    """
    get = _MetadataReader(g)
    # A token of only spaces is stored with real spaces; the normalizer turns spaces into "▁".
    tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in get.strings("tokenizer.ggml.tokens")]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for index, token in enumerate(tokens):
        for cut in range(len(token) - 1, 0, -1):  # longer left part first
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((index, left, right))
    merges.sort(key=lambda m: m[0])  # stable: keeps the longer-left-first order within a token
    unk = tokens[get.token_id("tokenizer.ggml.unknown_token_id", 3, len(tokens))]
    tok = Tokenizer(BPE(vocab=vocab, merges=[(l, r) for _, l, r in merges], unk_token=unk,
                        fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    return _finish_tokenizer(g, tok, tokens)


# -- conversion cache ------------------------------------------------------------------------

def cache_root() -> Path:
    base = os.environ.get("GEMMA4_NB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gemma4-nb"
    return Path(base) / "gguf"


def cache_dir_for(path: Path, fmt: str | None = None) -> Path:
    """The cache directory of a GGUF loaded in ``fmt`` (int8/int4: its repacked weights; None: the
    config and tokenizer only, the weights then come from the file itself)."""
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    return cache_root() / f"{path.stem}-{fmt or 'plain'}-{key}"


def check_repack_memory(g: GGUFFile) -> None:
    """Refuse, with the numbers, a repack that cannot fit: one block of rows in fp32 with its raw
    bytes and codes, and the tokenizer's vocabulary and merges (its weights are written as they are
    converted, never held)."""
    from .gguf_weights import BLOCK_ELEMENTS
    from .memory import GiB, MemoryPlanError, available_memory

    tokens = g.metadata.get("tokenizer.ggml.tokens")  # its type is checked later, with the config
    vocab = len(tokens) if isinstance(tokens, (list, tuple, np.ndarray)) else 0
    need = BLOCK_ELEMENTS * 7 + vocab * 1024
    free = available_memory("cpu")
    if need > free:
        raise MemoryPlanError(
            f"{g.path.name}: reading it needs about {need / GiB:.1f} GiB of memory but only {free / GiB:.1f} GiB is "
            "available; free memory or raise the process's memory limit, then load it again"
        )


def write_model_files(g: GGUFFile, out_dir: Path) -> dict:
    """The config, tokenizer, chat template and generation config of a GGUF, as a Hugging Face
    model directory holds them; returns the config."""
    path = g.path
    config = gguf_config(g)
    arch = ARCHITECTURES[g.architecture]
    tok = gguf_tokenizer(g)
    tokens = g.metadata["tokenizer.ggml.tokens"]  # checked by gguf_config
    get = _MetadataReader(g)
    special = {key: tokens[get.token_id(f"tokenizer.ggml.{field}", 0, len(tokens))]
               for key, field in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                  ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id"))
               if f"tokenizer.ggml.{field}" in g.metadata}
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    own_template = g.metadata.get("tokenizer.chat_template")
    # a GGUF without a chat template is a base model: the copilot asks it with plain-text prompts
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(dict(special, source=str(path), gemma4_nb_base_model=not own_template), indent=2))
    template = own_template or resources.files("gemma4_nb").joinpath(
        f"data/{arch.chat_template}").read_text(encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    eos = config["eos_token_id"]
    eos = ([eos] if isinstance(eos, int) else list(eos)) + [
        i for t in ("<end_of_turn>",) if (i := tok.token_to_id(t)) is not None]
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "pad_token_id": config["pad_token_id"]}, indent=2))
    (out_dir / SOURCE_TYPES_FILE).write_text(json.dumps(
        {hf: t.qtype.name for n, t in g.tensors.items() if (hf := hf_name(n))}, indent=0))
    return config


def convert(path: Path, out_dir: Path, fmt: str | None, progress=False) -> None:
    """Write the runtime's model directory for a GGUF file: config and tokenizer, and with ``fmt``
    the weights repacked in it (:func:`.gguf_weights.repack`, reporting to ``progress``)."""
    from .config import parse_config
    from .gguf_weights import repack

    g = GGUFFile(path)
    check_repack_memory(g)
    config = write_model_files(g, out_dir)
    if fmt is not None:
        repack(g, parse_config(config, where=str(path)), fmt, out_dir, progress)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))  # written last: marks completion


def gguf_format(path: Path, quant: str | None, plain: bool = False) -> str | None:
    """The weight format a GGUF loads in: none when ``plain`` (unquantized weights were asked for),
    else ``quant``, else the file's own (:func:`.gguf_weights.own_format`)."""
    from .gguf_weights import own_format

    if plain:
        return None
    if quant:
        return quant
    # the file's own format is remembered beside the cache: finding it parses the whole header
    # (2 s for a 262,144-token vocabulary), which a cached load otherwise never needs
    memo = cache_root() / f"{cache_dir_for(path, 'own').name}.json"
    try:
        return json.loads(memo.read_text(encoding="utf-8"))["format"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    fmt = own_format(GGUFFile(path))
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"format": fmt}), encoding="utf-8")
    except OSError:
        pass  # not remembered: found again next time
    return fmt


def prepare_gguf(path: Path, quant: str | None = None, plain: bool = False, progress=True) -> Path:
    """The cached model directory for a GGUF file, written on first use: with quantized weights
    (``quant``, or the file's own format) a directory :func:`~.quant.load_saved_quantized` reads;
    for unquantized weights (``plain``, or a F32/F16/BF16 file) the config and tokenizer only.
    ``progress``: True/False or a :class:`~.progress.LoadProgress` (the repack's bytes done)."""
    from .progress import as_progress

    progress = as_progress(progress)
    path = Path(path)
    fmt = gguf_format(path, quant, plain)
    target = cache_dir_for(path, fmt)
    if (target / "config.json").is_file():
        return target
    if progress.show:
        what = f"repacking its weights as {fmt} once" if fmt else "reading its metadata once"
        print(f"gemma4-nb: {path.name}: {what} (cached in {target})", file=sys.stderr, flush=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    except OSError as exc:
        raise CheckpointError(f"cannot create the conversion cache {target.parent} ({exc}); set GEMMA4_NB_CACHE") from None
    try:
        convert(path, tmp, fmt, progress)
        try:
            tmp.rename(target)  # atomic: a directory with config.json is always complete
        except OSError:
            if not (target / "config.json").is_file():  # not merely another process finishing first
                raise
    except OSError as exc:
        raise CheckpointError(
            f"cannot write the converted model to {target.parent} ({exc}); free disk space "
            "(about the GGUF's size) or point GEMMA4_NB_CACHE elsewhere"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
