"""A GGUF of a named shape with random weights, in llama.cpp's ``gemma4`` layout, so llama.cpp runs
the same shape as ``--shape`` in one benchmark (``gemma4-nb bench --shape gemma4-12b --compare
llama.cpp``). Written once per shape and type, then cached.

The metadata keys are the ones llama.cpp's ``gemma4`` loader reads and its converter
(``convert_hf_to_gguf.py``, ``Gemma4Model``) writes: per-layer ``head_count_kv``,
``sliding_window_pattern``, ``key_length``/``key_length_swa`` and ``rope.dimension_count(_swa)``,
``rope_freqs.weight`` (1.0 for the rotated pairs of full layers, 1e30 for the rest),
``layer_output_scale.weight`` per layer, no ``attn_v`` on K=V layers, and a BPE vocabulary with
``tokenizer.ggml.merges`` (llama.cpp refuses one without). The matrices are random blocks of the
chosen type (random codes, scales about the spread of ``0.02 * randn``); the token embedding,
which is also the output head, is Q8_0 as llama.cpp's own Q4 mixtures keep it at 6-8 bits.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..runtime.config import ModelConfig, parse_config
from .shapes import SHAPES
from .tiny import tiny_config

# gemma4-nb format -> the closest llama.cpp type of the layer matrices
LLAMA_TYPES = {"int4": "Q4_0", "int8": "Q8_0"}
WRITER_VERSION = 1  # part of the cache key: bump when the file's layout changes
ROW_BLOCK = 4096  # rows of random blocks generated at a time


def cache_path(shape: str, llama_type: str) -> Path:
    base = os.environ.get("GEMMA4_NB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gemma4-nb"
    return Path(base) / "bench" / f"{shape}-random-{llama_type.lower()}-v{WRITER_VERSION}.gguf"


def shape_gguf(shape: str, llama_type: str = "Q4_0", seed: int = 0) -> Path:
    """The cached GGUF of ``shape`` with random ``llama_type`` matrices (written on first use)."""
    path = cache_path(shape, llama_type)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        write(parse_config(tiny_config(**dict(SHAPES[shape]))), tmp, llama_type, seed, name=f"{shape} (random)")
        tmp.rename(path)
    return path


def _random_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """``rows`` rows of ``cols`` weights as random blocks of ``qtype`` (uint8 ``[rows, bytes]``)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    block, size = GGML_QUANT_SIZES[qtype]
    nblocks = cols // block
    out = rng.integers(0, 256, size=(rows, nblocks, size), dtype=np.uint8)
    step = 0.02 * 3 / {T.Q4_0: 7.5, T.Q8_0: 127.0, T.Q4_K: 7.5 * 32}[qtype]  # a block's scale
    d = (step * rng.uniform(0.5, 1.5, size=(rows, nblocks))).astype(np.float16)
    out[:, :, 0:2] = d.view(np.uint8).reshape(rows, nblocks, 2)
    if qtype == T.Q4_K:  # dmin, then 6-bit sub-scales and minimums (random bytes are valid)
        out[:, :, 2:4] = (0.5 * d).view(np.uint8).reshape(rows, nblocks, 2)
    return out.reshape(rows, nblocks * size)


def _vocabulary(n: int, cfg: ModelConfig):
    """``n`` distinct byte-level BPE tokens with the special ids of the config and one merge."""
    tokens = [f"<tok{i}>" for i in range(n)]
    for i, special in ((cfg.pad_token_id, "<pad>"), (cfg.bos_token_id, "<bos>"), (3, "<unk>")):
        if i is not None and i < n:
            tokens[i] = special
    for i in cfg.eos_token_ids:
        tokens[i] = "<eos>" if i == 1 else f"<eos{i}>"
    base = 16
    for j, ch in enumerate("abcdefghijklmnopqrstuvwxyz"):
        tokens[base + j] = ch
    tokens[base + 26] = "ab"
    return tokens, ["a b"]


def write(cfg: ModelConfig, path: Path, llama_type: str, seed: int = 0, name: str = "random") -> None:
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter, TokenType

    qtype = T[llama_type]
    rng = np.random.default_rng(seed)
    layers = cfg.layers
    full = [s for s in layers if s.kind == "full"]
    swa = [s for s in layers if s.kind == "sliding"]
    w = GGUFWriter(str(path), "gemma4")
    w.add_name(name)
    w.add_block_count(len(layers))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(layers[0].intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv([s.num_kv_heads for s in layers])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(full[0].head_dim)
    w.add_value_length(full[0].head_dim)
    w.add_key_length_swa(swa[0].head_dim)
    w.add_value_length_swa(swa[0].head_dim)
    w.add_rope_freq_base(full[0].rope.theta)
    w.add_rope_freq_base_swa(swa[0].rope.theta)
    w.add_rope_dimension_count(full[0].head_dim)
    w.add_rope_dimension_count_swa(swa[0].head_dim)
    w.add_sliding_window(swa[0].window)
    w.add_sliding_window_pattern([s.kind == "sliding" for s in layers])
    w.add_shared_kv_layers(0)
    w.add_embedding_length_per_layer_input(0)
    if cfg.final_softcap:
        w.add_final_logit_softcapping(cfg.final_softcap)
    tokens, merges = _vocabulary(cfg.vocab_size, cfg)
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([TokenType.CONTROL if t.startswith("<") and not t.startswith("<tok") else TokenType.NORMAL
                       for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_ids[0])
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)

    h = cfg.hidden_size
    pairs = full[0].rope.rotated_pairs
    plan: list[tuple[str, tuple[int, ...], object]] = [  # name, (out, in) or (n,), type
        ("token_embd.weight", (cfg.vocab_size, h), T.Q8_0),
        ("output_norm.weight", (h,), T.F32),
        ("rope_freqs.weight", (full[0].head_dim // 2,), T.F32),
    ]
    for s in layers:
        p, d = f"blk.{s.index}.", s.head_dim
        plan += [(p + "attn_norm.weight", (h,), T.F32),
                 (p + "attn_q.weight", (cfg.num_heads * d, h), qtype),
                 (p + "attn_k.weight", (s.num_kv_heads * d, h), qtype)]
        if not s.k_eq_v:
            plan.append((p + "attn_v.weight", (s.num_kv_heads * d, h), qtype))
        plan += [(p + "attn_q_norm.weight", (d,), T.F32), (p + "attn_k_norm.weight", (d,), T.F32),
                 (p + "attn_output.weight", (h, cfg.num_heads * d), qtype),
                 (p + "post_attention_norm.weight", (h,), T.F32), (p + "ffn_norm.weight", (h,), T.F32),
                 (p + "ffn_gate.weight", (s.intermediate_size, h), qtype),
                 (p + "ffn_up.weight", (s.intermediate_size, h), qtype),
                 (p + "ffn_down.weight", (h, s.intermediate_size), qtype),
                 (p + "post_ffw_norm.weight", (h,), T.F32), (p + "layer_output_scale.weight", (1,), T.F32)]

    def vector(tname: str, n: int) -> np.ndarray:
        if tname == "rope_freqs.weight":
            return np.array([1.0] * pairs + [1e30] * (n - pairs), dtype=np.float32)
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    from gguf import GGML_QUANT_SIZES

    for tname, dims, t in plan:
        if t == T.F32:
            w.add_tensor_info(tname, dims, np.dtype(np.float32), dims[0] * 4)
        else:
            block, size = GGML_QUANT_SIZES[t]
            w.add_tensor_info(tname, (dims[0], dims[1] // block * size), np.dtype(np.uint8),
                              dims[0] * dims[1] // block * size, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for tname, dims, t in plan:
        if t == T.F32:
            w.write_tensor_data(vector(tname, dims[0]))
            continue
        rows, cols = dims
        w.write_tensor_data(np.concatenate([_random_blocks(rng, min(ROW_BLOCK, rows - r), cols, t)
                                            for r in range(0, rows, ROW_BLOCK)]))
    w.close()


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of a GGUF's weights one decode step reads: every tensor (the token embedding is read
    whole as the tied output head)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)
