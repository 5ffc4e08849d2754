"""Write small GGUF files for tests (with gguf's own writer)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import quantize
from gguf.gguf_writer import GGUFValue

TINY = dict(hidden=64, ffn=128, layers=2, heads=2, kv=1, head_dim=32)


def tiny_vocab() -> list[str]:
    words = ["\u2581the", "\u2581data", "frame", "\u2581df", ".", "(", ")", "\u2581", "a", "b", "c", "d", "e", "t", "h"]
    return ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"] + \
        [f"<0x{i:02X}>" for i in range(256)] + words


def write_gguf(path, arch: str = "gemma3", tensor_types: dict[str, GGMLQuantizationType] | None = None, seed: int = 0,
               metadata: dict | None = None, nonfinite: dict[str, float] | None = None):
    """A complete tiny Gemma-3-style GGUF. ``tensor_types`` picks the storage type per tensor name
    (F32 otherwise); a type gguf cannot quantize is written as random bytes of the right size.
    ``metadata``: keys to replace (a value) or leave out (None). ``nonfinite``: tensor name -> a
    NaN or infinity written into it (a damaged file)."""
    rng = np.random.default_rng(seed)
    d = TINY
    vocab = tiny_vocab()
    w = GGUFWriter(str(path), arch)
    w.add_block_count(d["layers"])
    w.add_context_length(256)
    w.add_embedding_length(d["hidden"])
    w.add_feed_forward_length(d["ffn"])
    w.add_head_count(d["heads"])
    w.add_head_count_kv(d["kv"])
    w.add_key_length(d["head_dim"])
    w.add_value_length(d["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(16)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab)
    w.add_token_scores([0.0] * len(vocab))
    w.add_token_types([3] * 7 + [6] * 256 + [1] * (len(vocab) - 263))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    shapes = {"token_embd.weight": (len(vocab), d["hidden"]), "output_norm.weight": (d["hidden"],)}
    for i in range(d["layers"]):
        q, kv = d["heads"] * d["head_dim"], d["kv"] * d["head_dim"]
        shapes.update({
            f"blk.{i}.attn_norm.weight": (d["hidden"],), f"blk.{i}.attn_q.weight": (q, d["hidden"]),
            f"blk.{i}.attn_k.weight": (kv, d["hidden"]), f"blk.{i}.attn_v.weight": (kv, d["hidden"]),
            f"blk.{i}.attn_output.weight": (d["hidden"], q), f"blk.{i}.attn_q_norm.weight": (d["head_dim"],),
            f"blk.{i}.attn_k_norm.weight": (d["head_dim"],), f"blk.{i}.post_attention_norm.weight": (d["hidden"],),
            f"blk.{i}.ffn_norm.weight": (d["hidden"],), f"blk.{i}.post_ffw_norm.weight": (d["hidden"],),
            f"blk.{i}.ffn_gate.weight": (d["ffn"], d["hidden"]), f"blk.{i}.ffn_up.weight": (d["ffn"], d["hidden"]),
            f"blk.{i}.ffn_down.weight": (d["hidden"], d["ffn"]),
        })
    values = {}
    for name, shape in shapes.items():
        x = (1.0 + 0.1 * rng.standard_normal(shape) if name.endswith("norm.weight")
             else 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if name in (nonfinite or {}):
            x.flat[7] = nonfinite[name]
        values[name] = x
        qtype = (tensor_types or {}).get(name, GGMLQuantizationType.F32)
        if qtype == GGMLQuantizationType.F32:
            w.add_tensor(name, x)
        elif qtype == GGMLQuantizationType.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif qtype in (GGMLQuantizationType.BF16, GGMLQuantizationType.Q8_0):
            w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)
        else:  # raw bytes of the right size for a type we only need to refuse
            from gguf import GGML_QUANT_SIZES

            block, size = GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 255, (shape[0], shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qtype)
    for key, value in (metadata or {}).items():
        if value is None:
            w.kv_data[0].pop(key, None)
        elif isinstance(value, str):
            w.kv_data[0][key] = GGUFValue(value, GGUFValueType.STRING)
        elif isinstance(value, float):
            w.kv_data[0][key] = GGUFValue(value, GGUFValueType.FLOAT32)
        elif isinstance(value, int):
            w.kv_data[0][key] = GGUFValue(value, GGUFValueType.INT32)
        else:  # a list
            sub = GGUFValueType.STRING if value and isinstance(value[0], str) else GGUFValueType.INT32
            w.kv_data[0][key] = GGUFValue(list(value), GGUFValueType.ARRAY, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values
