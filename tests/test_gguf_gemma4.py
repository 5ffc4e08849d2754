"""Gemma 4 GGUFs as llama.cpp writes them: a tiny random transformers checkpoint converted by
llama.cpp's ``convert_hf_to_gguf.py`` and quantized by its quantizer, loaded by the runtime and
checked against transformers (F32/F16 files) and against llama.cpp on the same file (quantized)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from gguf_convert import FTYPES, convert, llama_cpp_logits, quantize

import gemma4_nb
from gemma4_nb.devtools.tiny import write_tokenizer
from gemma4_nb.errors import CheckpointError
from gemma4_nb.kernels.qweight import QWeight
from gemma4_nb.runtime.gguf_file import GGUFFile

# Every input width a multiple of 256 (K-quants need it); sliding and full layers with their own
# head sizes and KV heads, K=V full layers (no attn_v), partial RoPE on the full layers.
TEXT = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
            attention_k_eq_v=True, sliding_window=16, final_logit_softcapping=30.0, max_position_embeddings=1024,
            moe_intermediate_size=None,  # the converter's Gemma 4 path reads it
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])


@pytest.fixture(scope="session")
def gemma4_ggufs(tmp_path_factory):
    """One tiny Gemma 4 checkpoint (transformers' ``save_pretrained``) and its GGUFs, written once
    per session: ``f32``, ``f16`` by the converter; ``Q8_0``, ``Q4_0``, ``Q4_K_M``, ``Q6_K`` by the
    quantizer from the F32 file. Returns (checkpoint directory, reference model, name -> path)."""
    from conftest import randomize_
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    root = tmp_path_factory.mktemp("gemma4-gguf")
    ckpt = root / "ckpt"
    cfg = Gemma4UnifiedConfig(text_config=dict(TEXT), vision_config=None, audio_config=None)
    torch.manual_seed(7)
    model = Gemma4UnifiedForConditionalGeneration(cfg).eval()
    randomize_(model, 7)
    model.save_pretrained(ckpt)
    write_tokenizer(ckpt, TEXT["vocab_size"])  # the converter needs as many tokens as vocab_size
    files = {t: convert(ckpt, root / f"tiny-{t}.gguf", t) for t in ("f32", "f16")}
    for ftype in FTYPES:
        files[ftype] = quantize(files["f32"], root / f"tiny-{ftype}.gguf", ftype)
    assistant = root / "ckpt-assistant"
    make_assistant(assistant)
    files["assistant"] = convert(assistant, root / "assistant" / "tiny-assistant-f32.gguf", "f32")
    return ckpt, model, files


def make_assistant(out) -> None:
    """A tiny MTP assistant for TEXT's target (its layers read the target's K/V: the same head
    sizes and KV heads), written by transformers."""
    from conftest import randomize_
    from test_mtp import _allow_all_shared_layers
    from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM, Gemma4UnifiedTextConfig

    text = Gemma4UnifiedTextConfig(
        vocab_size=512, max_position_embeddings=1024, layer_types=["sliding_attention"] * 3 + ["full_attention"],
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, global_head_dim=128, num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=16,
        moe_intermediate_size=None)
    mp = _allow_all_shared_layers()
    try:
        cfg = Gemma4UnifiedAssistantConfig(text_config=text, backbone_hidden_size=TEXT["hidden_size"],
                                           use_ordered_embeddings=False)
        model = Gemma4UnifiedAssistantForCausalLM(cfg).eval()
        randomize_(model, 11)
        model.save_pretrained(out)
    finally:
        mp.undo()
    write_tokenizer(out, TEXT["vocab_size"])


def token_ids(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(30, TEXT["vocab_size"], (n - 1,), generator=gen).tolist()


def logits(model, ids) -> torch.Tensor:
    return model.net.forward(torch.tensor(ids), model.net.new_cache(), outputs="all").logits


def test_config_from_llama_cpp_metadata(gemma4_ggufs):
    _, _, files = gemma4_ggufs
    model = gemma4_nb.load(files["f32"], progress=False)
    cfg = model.config
    assert cfg.model_type == "gemma4_unified_text" and cfg.family.name == "gemma4"
    assert [s.kind for s in cfg.layers] == ["sliding", "full", "sliding", "full"]
    assert [(s.head_dim, s.num_kv_heads, s.k_eq_v) for s in cfg.layers] == \
        [(64, 2, False), (128, 1, True), (64, 2, False), (128, 1, True)]
    assert cfg.layers[1].rope.rotated_pairs == 16 and cfg.layers[0].rope.rotated_pairs == 32  # partial 0.25
    assert cfg.final_softcap == 30.0 and cfg.layers[0].window == 16 and cfg.vocab_size == 512
    assert model.quant is None and model.net.dtype == torch.float32  # an F32 file stays unquantized


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_float_files_match_transformers(gemma4_ggufs, kind):
    _, reference, files = gemma4_ggufs
    model = gemma4_nb.load(files[kind], dtype="fp32", progress=False)
    ids = token_ids(96, seed=1)
    with torch.no_grad():
        want = reference(input_ids=torch.tensor([ids])).logits[0].float()
    if kind == "f16":  # the file holds the weights rounded to fp16: the reference gets the same rounding
        with torch.no_grad():
            rounded = {k: v.half().float() if v.dim() == 2 else v for k, v in reference.state_dict().items()}
            ref16 = type(reference)(reference.config).eval()
            ref16.load_state_dict(rounded)
            want = ref16(input_ids=torch.tensor([ids])).logits[0].float()
    got = logits(model, ids)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-4, f"max |logit difference| {rel:.2e} of the logits' magnitude"


@pytest.mark.parametrize("ftype,fmt,target", [("Q8_0", "int8", 0.99), ("Q4_0", "int4", 0.99),
                                              ("Q4_K_M", "int4", 0.97), ("Q6_K", "int8", 0.97)])
def test_quantized_files_agree_with_llama_cpp(gemma4_ggufs, ftype, fmt, target):
    """The file's own format, kept quantized: top-1 against llama.cpp running the same file,
    teacher-forced over 256 positions."""
    _, _, files = gemma4_ggufs
    model = gemma4_nb.load(files[ftype], progress=False)
    assert model.quant == fmt
    assert all(isinstance(model.net.weights[f"layers.{i}.mlp.down_proj.weight"], QWeight) for i in range(4))
    ids = token_ids(256, seed=2)
    mine = logits(model, ids).numpy()
    theirs = llama_cpp_logits(files[ftype], ids)
    agreement = float((mine.argmax(-1) == theirs.argmax(-1)).mean())
    print(f"{ftype} as {fmt}: top-1 agreement with llama.cpp {agreement * 100:.1f}% over 256 positions")
    assert agreement >= target


def test_blocks_map_into_the_runtime_format(gemma4_ggufs):
    """Q8_0 and Q4_0 to int8 and Q4_K to int4 are the file's numbers exactly; Q4_0 to int4 keeps
    its codes with 8-bit sub-scales (a small fraction of a quantization step)."""
    from gguf.quants import dequantize

    _, _, files = gemma4_ggufs
    for ftype, quant, exact in (("Q8_0", None, True), ("Q4_0", "int8", True), ("Q4_K_M", None, True),
                                ("Q4_0", None, False)):
        g = GGUFFile(files[ftype])
        model = gemma4_nb.load(files[ftype], quant=quant, progress=False)
        info = g.tensors["blk.0.ffn_gate.weight"]
        want = torch.from_numpy(dequantize(g.rows(info), info.qtype))
        got = model.net.weights["layers.0.mlp.gate_proj.weight"].dequantize()
        if exact:
            assert torch.equal(got, want), (ftype, quant, (got - want).abs().max())
        else:
            step = want.reshape(-1, 32).abs().amax(-1) / 8  # Q4_0's step: |d| = max|w| / 8
            err = (got - want).reshape(-1, 32).abs().amax(-1) / step
            assert err.max() < 0.25 and err.mean() < 0.02, (err.max(), err.mean())


def test_repacked_once_then_memory_mapped(gemma4_ggufs, conversion_cache):
    _, _, files = gemma4_ggufs
    first = gemma4_nb.load(files["Q4_K_M"], progress=False)
    packed = first.model_dir / "model.safetensors"
    assert packed.is_file() and (first.model_dir / "gemma4_nb_quant.json").is_file()
    stamp = packed.stat().st_mtime_ns
    again = gemma4_nb.load(files["Q4_K_M"], progress=False)
    assert again.model_dir == first.model_dir and packed.stat().st_mtime_ns == stamp
    assert packed.stat().st_size < files["Q4_K_M"].stat().st_size * 1.5  # quantized, not fp32
    plain = gemma4_nb.load(files["Q4_K_M"], quant="fp32", progress=False)  # dequantized, nothing cached in fp32
    assert plain.quant is None and not list(plain.model_dir.glob("*.safetensors"))
    ids = token_ids(64, seed=3)
    agree = (logits(plain, ids).argmax(-1) == logits(again, ids).argmax(-1)).float().mean()
    assert agree >= 0.95


def test_tokenizer_matches_llama_cpp(gemma4_ggufs):
    """The vocabulary and merges of the file tokenize as llama.cpp tokenizes them."""
    from llama_cpp import Llama

    _, _, files = gemma4_ggufs
    model = gemma4_nb.load(files["Q8_0"], progress=False)
    llm = Llama(model_path=str(files["Q8_0"]), vocab_only=True, verbose=False)
    try:
        for text in ["import pandas as pd\ndf = pd.read_csv('sales.csv')\n\n\ndf.head()", "naïve café 🙂  two  spaces",
                     " leading space", "a\n\nb\n", "Plot revenue<turn|>\n<eos>"]:
            want = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert model.tokenizer.encode(text, add_special_tokens=False) == want, text
        assert model.encode("df.head()")[0] == 2  # BOS, as the file asks
    finally:
        llm.close()


def test_damaged_gemma4_files_are_named(gemma4_ggufs, tmp_path):
    _, _, files = gemma4_ggufs
    cut = tmp_path / "cut.gguf"
    data = files["Q4_0"].read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: the file is truncated"):
        gemma4_nb.load(cut, progress=False)
    # a block scale turned to infinity: refused by the tensor's GGUF name, nothing cached
    g = GGUFFile(files["Q8_0"])
    info = g.tensors["blk.2.ffn_up.weight"]
    bad = tmp_path / "inf.gguf"
    shutil.copy(files["Q8_0"], bad)
    with open(bad, "r+b") as fh:
        fh.seek(info.offset + 34 * 5)
        fh.write(np.array([np.inf], dtype=np.float16).tobytes())
    with pytest.raises(CheckpointError, match=r"blk\.2\.ffn_up\.weight \(scales\) holds 1 non-finite"):
        gemma4_nb.load(bad, progress=False)
    assert not list(conversion_dirs_for(bad))


def conversion_dirs_for(path):
    from gemma4_nb.runtime.gguf_file import cache_root

    return [p for p in cache_root().glob(f"{path.stem}-*") if (p / "config.json").is_file()]


def test_mtp_assistant_gguf_beside_the_model(gemma4_ggufs, tmp_path):
    """A ``gemma4-assistant`` GGUF in the model's folder is found and drafts; its weights are the
    safetensors assistant's, and drafting leaves greedy output unchanged."""
    from gemma4_nb.runtime.mtp import MTPDrafter

    ckpt, _, files = gemma4_ggufs
    folder = tmp_path / "lmstudio" / "google" / "gemma-4-tiny"
    folder.mkdir(parents=True)
    shutil.copy(files["Q8_0"], folder / "tiny-Q8_0.gguf")
    shutil.copy(files["assistant"], folder / "tiny-assistant.gguf")
    model = gemma4_nb.load(folder / "tiny-Q8_0.gguf", progress=False)
    assert isinstance(model.drafter, MTPDrafter) and model.drafter.source == folder / "tiny-assistant.gguf"
    ids = token_ids(40, seed=4)
    drafted = model.generate(ids, max_new_tokens=24, temperature=0)
    assert model.last_usage.drafting is not None and model.last_usage.drafting.proposed > 0
    assert drafted == model.generate(ids, max_new_tokens=24, temperature=0, draft=False)
    alone = gemma4_nb.load(files["f32"], progress=False)  # no assistant beside it: none
    assert not isinstance(alone.drafter, MTPDrafter)
    from_gguf = gemma4_nb.load(files["f32"], assistant=files["assistant"], dtype="fp32", progress=False)
    from_safetensors = gemma4_nb.load(files["f32"], assistant=files["assistant"].parent.parent / "ckpt-assistant",
                                      dtype="fp32", progress=False)
    mine, theirs = from_gguf.drafter.net.weights, from_safetensors.drafter.net.weights
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(from_gguf.drafter.pre, from_safetensors.drafter.pre)


def test_a_folder_of_model_and_assistant_ggufs(gemma4_ggufs, tmp_path, monkeypatch):
    """A folder (LM Studio's layout) holding the model's GGUF and its ``gemma4-assistant`` GGUF,
    both written by llama.cpp's converter: ``load(folder)`` and ``lmstudio:`` pick the model, never
    the assistant, and the assistant drafts as the safetensors assistant does; `gemma4-nb models`
    lists one model."""
    from gemma4_nb.runtime.local_stores import gguf_role, list_lmstudio
    from gemma4_nb.runtime.mtp import MTPDrafter

    _, _, files = gemma4_ggufs
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / ".lmstudio" / "models" / "google" / "gemma-4-tiny-GGUF"
    folder.mkdir(parents=True)
    # named so that the assistant sorts first and carries no telling name: its header says what it is
    shutil.copy(files["assistant"], folder / "gemma-4-tiny-a-Q8_0.gguf")
    shutil.copy(files["Q8_0"], folder / "gemma-4-tiny-it-Q8_0.gguf")
    assert [gguf_role(p) for p in sorted(folder.iterdir())] == ["assistant", "model"]
    for ref in (folder, "lmstudio:google/gemma-4-tiny-GGUF"):
        model = gemma4_nb.load(ref, progress=False)
        assert model.source == (folder / "gemma-4-tiny-it-Q8_0.gguf").absolute()
        assert isinstance(model.drafter, MTPDrafter) and model.drafter.source == folder / "gemma-4-tiny-a-Q8_0.gguf"
    assert [(m.ref, m.path.name) for m in list_lmstudio()] == [("lmstudio:google/gemma-4-tiny-GGUF",
                                                                "gemma-4-tiny-it-Q8_0.gguf")]
    ids = token_ids(40, seed=5)
    drafted = model.generate(ids, max_new_tokens=24, temperature=0)
    assert model.last_usage.drafting is not None and model.last_usage.drafting.proposed > 0
    assert drafted == model.generate(ids, max_new_tokens=24, temperature=0, draft=False)
    # the same drafter as the safetensors assistant beside the same model
    from_safetensors = gemma4_nb.load(folder, assistant=files["assistant"].parent.parent / "ckpt-assistant",
                                      progress=False)
    mine, theirs = model.drafter.net.weights, from_safetensors.drafter.net.weights
    assert mine.keys() == theirs.keys()
    for k in mine:
        a, b = mine[k], theirs[k]
        assert torch.equal(a.dequantize(), b.dequantize()) if hasattr(a, "dequantize") else torch.equal(a, b), k


def test_images_ask_for_what_a_gguf_lacks(gemma4_ggufs):
    """A Gemma 4 GGUF is the text model (llama.cpp keeps vision and audio in an mmproj file): with
    no projector beside it, an image is refused with a note that says how to add one."""
    from gemma4_nb.errors import PromptError

    _, _, files = gemma4_ggufs
    model = gemma4_nb.load(files["Q8_0"], progress=False)
    image = np.zeros((96, 96, 3), dtype=np.uint8)
    with pytest.raises(PromptError, match=r"no projector \(mmproj\) file was found for this GGUF; to add images and "
                                          r"audio, put the model's mmproj-\*\.gguf"):
        model.chat([{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "?"}]}],
                   max_new_tokens=2)


def test_bench_interleaves_decode_steps_with_llama_cpp(gemma4_ggufs, capsys):
    """``gemma4-nb bench --compare llama.cpp --interleave`` on a file llama.cpp wrote: both engines
    prefill and then decode in alternating steps, each row from its own engine's steps, and the
    ratio lines printed; without ``--compare llama.cpp`` it says what it needs."""
    from gemma4_nb.devtools.bench import bench_command

    _, _, files = gemma4_ggufs
    rows = bench_command(model=str(files["Q8_0"]), device="cpu", threads=1, prompt=24, decode=6, repeat=2,
                         compare="llama.cpp", tokens="random", interleave=True)
    assert [r["engine"] for r in rows] == ["gemma4-nb", "llama.cpp"] * 2
    for r in rows:
        assert r["ttft_s"] > 0 and r["prefill_tok_s"] > 0
        assert r["decode_tok_s"] > 0 and r["decode_mean_tok_s"] > 0
    assert all(r["peak_rss_gib"] > 0 for r in rows[::2])
    out = capsys.readouterr().out
    assert "steps alternating one by one" in out and "decode from each engine's mean step instead" in out
    assert "ratio gemma4-nb / llama.cpp, decode:" in out
    with pytest.raises(SystemExit, match="needs --compare llama.cpp"):
        bench_command(model=str(files["Q8_0"]), device="cpu", prompt=8, decode=2, interleave=True)
