"""GGUF checkpoints (llama.cpp's format) turned into the runtime's own model directory.

The first load reads the GGUF header, maps its metadata to a ``config.json``, dequantizes the
tensors to fp32 (F32, F16, BF16, Q8_0, Q5_0, Q4_K, Q6_K) under the Hugging Face names, rebuilds the
tokenizer from the vocabulary as a ``tokenizers`` tokenizer, and writes all of it to a cache
directory. Later loads are ordinary memory-mapped safetensors loads from that directory.

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
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ..errors import CheckpointError, ConfigError
from .checkpoint import CHECKED_FINITE, check_finite

CONVERTER_VERSION = "3"
SOURCE_TYPES_FILE = "gguf_tensor_types.json"  # checkpoint name -> GGUF type (quantization reads it)
GGUF_MAGIC = b"GGUF"
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_K", "Q6_K")

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
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class Architecture:
    """How one GGUF architecture maps to a Hugging Face config."""

    model_type: str
    norms_store_one_plus_w: bool  # llama.cpp's converter stores (1 + w) for these norms
    chat_template: str  # fallback when the file carries none


ARCHITECTURES = {
    "gemma3": Architecture("gemma3_text", norms_store_one_plus_w=True, chat_template="gemma3_chat_template.jinja"),
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

    def blocks(self, info: TensorInfo) -> np.ndarray:
        """A tensor's stored bytes as uint8 ``[rows, bytes per row]`` (a view of the mapped file)."""
        raw = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return raw.reshape(int(np.prod(info.shape[:-1])), -1)

    def by_hf_name(self) -> dict[str, TensorInfo]:
        """The tensors under their Hugging Face names."""
        return {hf: info for name, info in self.tensors.items() if (hf := hf_name(name)) is not None}

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        """One tensor dequantized to fp32, in row-major shape."""
        name = info.qtype.name
        if name not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{self.path}: tensor {info.name} is stored as {name}, which this runtime cannot read "
                f"(supported: {', '.join(SUPPORTED_TYPES)}); use a GGUF quantized as Q4_K_M, Q5_K_M, Q6_K or Q8_0"
            )
        raw = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        if name == "F32":
            return torch.from_numpy(raw.view(np.float32).reshape(info.shape).copy())
        if name == "F16":
            return torch.from_numpy(raw.view(np.float16).reshape(info.shape).astype(np.float32))
        if name == "BF16":
            return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float().reshape(info.shape)
        if name == "Q8_0":  # 34-byte blocks: fp16 scale, 32 int8 values
            blocks = torch.from_numpy(raw.reshape(-1, 34).copy())
            out = torch.empty((blocks.shape[0], 32), dtype=torch.float32)
            out.copy_(blocks[:, 2:].contiguous().view(torch.int8))
            out.mul_(blocks[:, :2].contiguous().view(torch.float16).float())
            return out.reshape(info.shape)
        rows = raw.reshape(*info.shape[:-1], -1)
        return torch.from_numpy(dequantize(rows, info.qtype)).reshape(info.shape)


# -- config ----------------------------------------------------------------------------------

def gguf_config(g: GGUFFile) -> dict:
    """A Hugging Face ``config.json`` dict for the file's model."""
    arch = g.architecture
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{g.path}: GGUF architecture {arch!r} is not supported. Supported: {', '.join(sorted(ARCHITECTURES))} "
            "(Gemma 4 checkpoints load from their Hugging Face safetensors)"
        )
    get = _MetadataReader(g)
    n_layers = get.int(f"{arch}.block_count")
    hidden, n_heads = get.int(f"{arch}.embedding_length"), get.int(f"{arch}.attention.head_count")
    head_dim = get.int(f"{arch}.attention.key_length", hidden // n_heads)
    # llama.cpp's rule: the 27B model scales queries by hidden/heads, the others by head_dim
    scalar = hidden // n_heads if n_layers == 62 else head_dim
    full_rope = {"rope_type": "default", "rope_theta": get.float(f"{arch}.rope.freq_base", 1_000_000.0)}
    factor = get.float(f"{arch}.rope.scaling.factor", None)
    if factor and factor != 1.0:
        full_rope.update(rope_type="linear", factor=factor)
    tokens = get.strings("tokenizer.ggml.tokens")
    return {
        "model_type": ARCHITECTURES[arch].model_type,
        "vocab_size": len(tokens),
        "hidden_size": hidden,
        "intermediate_size": get.int(f"{arch}.feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": get.int(f"{arch}.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "query_pre_attn_scalar": scalar,
        "rms_norm_eps": get.float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "sliding_window": get.int(f"{arch}.attention.sliding_window", 4096),
        "sliding_window_pattern": 6,
        "max_position_embeddings": get.int(f"{arch}.context_length", 8192),
        "final_logit_softcapping": get.float(f"{arch}.final_logit_softcapping", None),
        "attn_logit_softcapping": get.float(f"{arch}.attn_logit_softcapping", None),
        "rope_parameters": {"full_attention": full_rope,
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "pad_token_id": get.token_id("tokenizer.ggml.padding_token_id", 0, len(tokens)),
        "bos_token_id": get.token_id("tokenizer.ggml.bos_token_id", 2, len(tokens)),
        "eos_token_id": get.token_id("tokenizer.ggml.eos_token_id", 1, len(tokens)),
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
        mapped = BLOCK_TENSORS.get(part)
        return f"model.layers.{index}.{mapped}.{suffix}" if mapped else None
    mapped = GLOBAL_TENSORS.get(stem)
    return f"{mapped}.{suffix}" if mapped else None


def gguf_tensors(g: GGUFFile) -> dict[str, torch.Tensor]:
    """Every tensor, dequantized to fp32 under its Hugging Face name."""
    arch = ARCHITECTURES[g.architecture]
    out = {}
    unknown = [n for n in g.tensors if hf_name(n) is None]
    if unknown:
        raise CheckpointError(f"{g.path}: tensors this runtime does not know: {', '.join(unknown[:8])}")
    for name, info in g.tensors.items():
        try:
            t = g.tensor(info)
        except (ValueError, RuntimeError) as exc:  # a size that does not match the shape or the type
            raise CheckpointError(f"{g.path}: tensor {name} cannot be read ({exc}); the file is damaged") from None
        check_finite(name, t, g.path)  # a damaged block: refused by its GGUF name before anything is cached
        if arch.norms_store_one_plus_w and name.endswith("norm.weight"):
            t = t - 1.0  # back to the Hugging Face convention, where the model adds the 1
        out[hf_name(name)] = t.contiguous()
    return out


# -- tokenizer -------------------------------------------------------------------------------

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


def gguf_tokenizer(g: GGUFFile) -> Tokenizer:
    """Gemma's byte-fallback BPE rebuilt from the vocabulary.

    GGUF keeps no merges for Gemma; they follow from the vocabulary: every token that splits into
    two tokens yields a merge, ranked by the token's position in the file (earlier merges first),
    the longer left part first among splits of the same token.
    """
    md = g.metadata
    get = _MetadataReader(g)
    if md.get("tokenizer.ggml.model") != "llama":
        raise ConfigError(f"{g.path}: tokenizer model {md.get('tokenizer.ggml.model')!r} is not supported (llama/SentencePiece)")
    # A token of only spaces is stored with real spaces; the normalizer turns spaces into "▁".
    tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in get.strings("tokenizer.ggml.tokens")]
    types = md.get("tokenizer.ggml.token_type", np.ones(len(tokens), dtype=np.int32))
    if not isinstance(types, np.ndarray) or types.ndim != 1 or len(types) != len(tokens):
        raise get._wrong("tokenizer.ggml.token_type", types, f"an array of {len(tokens)} token types")
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
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])
    if md.get("tokenizer.ggml.add_bos_token", True):
        bos_id = get.token_id("tokenizer.ggml.bos_token_id", 2, len(tokens))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos_id]} $A", pair=f"{tokens[bos_id]} $A $B", special_tokens=[(tokens[bos_id], bos_id)])
    return tok


# -- conversion cache ------------------------------------------------------------------------

def cache_root() -> Path:
    base = os.environ.get("GEMMA4_NB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gemma4-nb"
    return Path(base) / "gguf"


def cache_dir_for(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    return cache_root() / f"{path.stem}-{key}"


def check_conversion_memory(g: GGUFFile) -> None:
    """Refuse, with the numbers, a conversion that cannot fit: every tensor is held in fp32 until
    it is written, plus the dequantization of the largest one in flight and the tokenizer's merges
    (the embedded 270M: 1.0 GiB of fp32 tensors, 1.5 GB measured at the peak, 1.6 GiB estimated)."""
    from .memory import GiB, MemoryPlanError, available_memory

    sizes = [4 * int(np.prod(t.shape)) for t in g.tensors.values()]
    vocab = len(g.metadata.get("tokenizer.ggml.tokens") or [])
    need = sum(sizes) + max(sizes, default=0) // 2 + vocab * 1024
    free = available_memory("cpu")
    if need > free:
        raise MemoryPlanError(
            f"{g.path.name}: converting it needs about {need / GiB:.1f} GiB of memory (its tensors in fp32) but only "
            f"{free / GiB:.1f} GiB is available; free memory or raise the process's memory limit, then load it again "
            "(the conversion is cached: it runs once)"
        )


def convert(path: Path, out_dir: Path) -> None:
    """Write the runtime's model directory for a GGUF file."""
    g = GGUFFile(path)
    config = gguf_config(g)
    arch = ARCHITECTURES[g.architecture]
    check_conversion_memory(g)
    tok = gguf_tokenizer(g)
    tensors = gguf_tensors(g)
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
    eos = [config["eos_token_id"]] + [i for t in ("<end_of_turn>",) if (i := tok.token_to_id(t)) is not None]
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "pad_token_id": config["pad_token_id"]}, indent=2))
    save_file(tensors, str(out_dir / "model.safetensors"),
              metadata={"format": "pt", "source": path.name, CHECKED_FINITE: "yes"})  # gguf_tensors checked them
    (out_dir / SOURCE_TYPES_FILE).write_text(json.dumps(
        {hf_name(n): t.qtype.name for n, t in g.tensors.items()}, indent=0))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))  # written last: marks completion


def prepare_gguf(path: Path, progress: bool = True) -> Path:
    """The cached model directory for a GGUF file, converting it on first use."""
    path = Path(path)
    target = cache_dir_for(path)
    if (target / "config.json").is_file():
        return target
    if progress:
        print(f"gemma4-nb: converting {path.name} once (cached in {target})", file=sys.stderr, flush=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    except OSError as exc:
        raise CheckpointError(f"cannot create the conversion cache {target.parent} ({exc}); set GEMMA4_NB_CACHE") from None
    try:
        convert(path, tmp)
        try:
            tmp.rename(target)  # atomic: a directory with config.json is always complete
        except OSError:
            if not (target / "config.json").is_file():  # not merely another process finishing first
                raise
    except OSError as exc:
        raise CheckpointError(
            f"cannot write the converted model to {target.parent} ({exc}); free disk space "
            "(about 4 bytes per parameter) or point GEMMA4_NB_CACHE elsewhere"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
