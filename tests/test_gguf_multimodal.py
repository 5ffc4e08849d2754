"""Images and audio from a Gemma 4 GGUF's projector: a tiny random transformers checkpoint with
vision and audio, converted by llama.cpp's ``convert_hf_to_gguf.py`` into the text GGUF and, with
``--mmproj``, the projector (F32 and F16), loaded as LM Studio and Ollama keep them, and checked
against transformers (the soft tokens and the logits of a prompt with an image and an audio clip)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from gguf_convert import convert_many

import gemma4_nb
from gemma4_nb.devtools.tiny import SPECIAL_TOKENS, write_tokenizer
from gemma4_nb.errors import PromptError
from gemma4_nb.runtime.decoder import SoftTokens
from gemma4_nb.runtime.multimodal import audio_frames, image_patches

TOKENS = {name: SPECIAL_TOKENS.index(tok) for name, tok in [
    ("image_token_id", "<|image|>"), ("audio_token_id", "<|audio|>"), ("boi_token_id", "<|image>"),
    ("eoi_token_id", "<image|>"), ("boa_token_id", "<|audio>"), ("eoa_token_index", "<audio|>")]}
TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
            attention_k_eq_v=True, sliding_window=24, final_logit_softcapping=30.0, max_position_embeddings=2048,
            moe_intermediate_size=None,  # the converter's Gemma 4 path reads it
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"])
# what transformers' Gemma4UnifiedImageProcessor saves (the converter reads image_mean/std from it):
# pixels rescaled to [0, 1], no normalization
PREPROCESSOR = {"image_processor_type": "Gemma4UnifiedImageProcessor", "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": False, "image_mean": [0.0, 0.0, 0.0],
                "image_std": [1.0, 1.0, 1.0], "patch_size": 16, "pooling_kernel_size": 3}


@pytest.fixture(scope="session")
def mm_ggufs(tmp_path_factory):
    """The checkpoint, the transformers model that wrote it, and its GGUFs (``text-f32``,
    ``text-f16``, ``mmproj-f32``, ``mmproj-f16``), converted once per session in one process."""
    from conftest import randomize_
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    root = tmp_path_factory.mktemp("gemma4-mm-gguf")
    ckpt = root / "ckpt"
    cfg = Gemma4UnifiedConfig(text_config=dict(TEXT),
                              vision_config=dict(mm_embed_dim=48, output_proj_dims=48, mm_posemb_size=64),
                              audio_config=dict(audio_embed_dim=640), **TOKENS)
    torch.manual_seed(0)
    ref = Gemma4UnifiedForConditionalGeneration(cfg).eval()
    randomize_(ref, seed=5)
    with torch.no_grad():
        ref.model.embed_vision.pos_embedding.normal_(0, 0.5)
    ref.save_pretrained(ckpt)
    write_tokenizer(ckpt, TEXT["vocab_size"])  # the converter needs as many tokens as vocab_size
    (ckpt / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    jobs = [(ckpt, root / f"{part}-{t}.gguf", t, part == "mmproj") for part in ("text", "mmproj") for t in ("f32", "f16")]
    files = {out.stem: out for out in convert_many(jobs)}
    return ckpt, ref, files


def model_folder(tmp_path, files, kind: str, projector: bool = True):
    """An LM Studio style folder: the model's GGUF with its projector beside it."""
    folder = tmp_path / "lmstudio" / "google" / f"gemma-4-tiny-{kind}"
    folder.mkdir(parents=True)
    shutil.copy(files[f"text-{kind}"], folder / f"gemma-4-tiny-{kind.upper()}.gguf")
    if projector:
        shutil.copy(files[f"mmproj-{kind}"], folder / f"mmproj-gemma-4-tiny-{kind.upper()}.gguf")
    return folder


def gradient(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


IMAGE = gradient(200, 300)
AUDIO = (0.3 * np.sin(2 * np.pi * 440 * np.arange(12000) / 16000)).astype(np.float32)


def conversation():
    return [{"role": "user", "content": [
        {"type": "text", "text": "What does this plot show"},
        {"type": "image", "image": IMAGE, "max_soft_tokens": 70},
        {"type": "text", "text": "and what is said here?"},
        {"type": "audio", "audio": AUDIO, "sampling_rate": 16000},
    ]}]


def rounded_to_f16(ref):
    """The reference with its weights rounded as the F16 files store them: the matrices in fp16
    (the converter keeps vectors, the layer scalars and the position table in F32)."""
    state = {k: v.half().float() if v.dim() == 2 else v for k, v in ref.state_dict().items()}
    out = type(ref)(ref.config).eval()
    out.load_state_dict(state)
    return out


def reference_outputs(ref, ids: torch.Tensor):
    """transformers' soft tokens (image, then audio) and logits for the prompt ``ids`` holding
    IMAGE and AUDIO, with the masks its generate() builds for the prefill."""
    p = image_patches(IMAGE, 70)
    frames = audio_frames(AUDIO, 16000)
    mm_types = torch.zeros_like(ids)
    mm_types[ids == TOKENS["image_token_id"]] = 1
    mm_types[ids == TOKENS["audio_token_id"]] = 3
    masks = type(ref).create_masks_for_generate(ref.config, torch.zeros(1, len(ids), TEXT["hidden_size"]), None, None,
                                                torch.arange(len(ids))[None], mm_token_type_ids=mm_types[None])
    with torch.no_grad():
        img = ref.model.get_image_features(p.patches[None], p.positions[None]).pooler_output[0]
        aud = ref.model.get_audio_features(frames[None], torch.ones(1, len(frames), dtype=torch.bool)).pooler_output[0]
        out = ref(input_ids=ids[None], pixel_values=p.patches[None], image_position_ids=p.positions[None],
                  input_features=frames[None], input_features_mask=torch.ones(1, len(frames), dtype=torch.bool),
                  mm_token_type_ids=mm_types[None], attention_mask=masks)
    return torch.cat([img, aud]), out.logits[0]


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_projector_matches_the_safetensors_checkpoint(mm_ggufs, tmp_path, kind):
    """The model found in a folder with its mmproj: the embedders' config and the soft tokens and
    logits of a prompt with an image and an audio clip are the checkpoint's (F16: against the
    reference with its weights rounded as the files store them)."""
    ckpt, ref, files = mm_ggufs
    folder = model_folder(tmp_path, files, kind)
    model = gemma4_nb.load(folder, dtype="fp32", progress=False)
    safetensors = gemma4_nb.load(ckpt, dtype="fp32", progress=False)
    assert model.projector == (folder / f"mmproj-gemma-4-tiny-{kind.upper()}.gguf").absolute()
    assert model.config.vision == safetensors.config.vision and model.config.audio == safetensors.config.audio
    assert model.config.media_tokens == safetensors.config.media_tokens
    prompt = model.prepare_chat(conversation())
    ids = torch.tensor(prompt.ids)
    n_img, n_aud = int((ids == TOKENS["image_token_id"]).sum()), int((ids == TOKENS["audio_token_id"]).sum())
    assert n_img == image_patches(IMAGE, 70).n_tokens and n_aud == len(audio_frames(AUDIO, 16000))
    want_soft, want_logits = reference_outputs(ref if kind == "f32" else rounded_to_f16(ref), ids)
    assert prompt.soft.shape == want_soft.shape == (n_img + n_aud, TEXT["hidden_size"])
    soft_rel = ((prompt.soft - want_soft).abs().max() / want_soft.abs().max()).item()
    got = model.net.forward(ids, model.net.new_cache(), soft=SoftTokens(prompt.soft_mask, prompt.soft, prompt.blocks),
                            outputs="all").logits
    logit_rel = ((got - want_logits).abs().max() / want_logits.abs().max()).item()
    print(f"{kind}: soft tokens {soft_rel:.1e}, logits {logit_rel:.1e} of their magnitudes")
    assert soft_rel <= 1e-4 and logit_rel <= 1e-4
    if kind == "f32":  # the safetensors checkpoint's own embedders give the same soft tokens
        same = safetensors.prepare_chat(conversation()).soft
        assert ((prompt.soft - same).abs().max() / same.abs().max()).item() <= 1e-5
    reply = model.chat(conversation(), max_new_tokens=6, temperature=0)
    assert isinstance(reply, str) and model.last_usage.prompt_tokens == len(prompt.ids)


def test_quantized_text_with_projector(mm_ggufs, tmp_path):
    """Quantized text weights (int8 repack of the F32 file) keep the projector's embedders in the
    activation dtype: the soft tokens are the same as with plain weights."""
    _, _, files = mm_ggufs
    folder = model_folder(tmp_path, files, "f32")
    plain = gemma4_nb.load(folder, dtype="fp32", progress=False)
    quantized = gemma4_nb.load(folder, quant="int8", progress=False)
    assert quantized.quant == "int8"
    a, b = plain.prepare_chat(conversation()), quantized.prepare_chat(conversation())
    assert a.ids == b.ids and torch.equal(a.soft, b.soft)
    assert isinstance(quantized.chat(conversation(), max_new_tokens=4, temperature=0), str)


def test_ollama_projector_layer_gives_images(mm_ggufs, tmp_path, monkeypatch):
    """An Ollama model whose manifest has a projector layer takes images and audio (the blobs
    are named by their sha256, without the mmproj name)."""
    from test_local_stores import MODEL, PROJECTOR, add_blob, add_manifest

    _, _, files = mm_ggufs
    store = tmp_path / "ollama" / "models"
    add_manifest(store, "gemma4", "tiny", [(MODEL, add_blob(store, files["text-f32"])),
                                           (PROJECTOR, add_blob(store, files["mmproj-f32"]))])
    add_manifest(store, "gemma4", "text-only", [(MODEL, add_blob(store, files["text-f32"]))])
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    model = gemma4_nb.load("ollama:gemma4:tiny", dtype="fp32", progress=False)
    assert model.projector.parent == store / "blobs" and "mmproj" not in model.projector.name
    direct = gemma4_nb.load(model_folder(tmp_path, files, "f32"), dtype="fp32", progress=False)
    got, want = model.prepare_chat(conversation()), direct.prepare_chat(conversation())
    assert got.ids == want.ids and torch.equal(got.soft, want.soft)
    assert model.chat(conversation(), max_new_tokens=5, temperature=0) == \
        direct.chat(conversation(), max_new_tokens=5, temperature=0)
    text_only = gemma4_nb.load("ollama:gemma4:text-only", dtype="fp32", progress=False)
    with pytest.raises(PromptError, match="no projector .* pull a Gemma 4 model whose manifest has a projector"):
        text_only.chat(conversation(), max_new_tokens=2)


def test_without_a_usable_projector_the_text_model_works_and_media_say_why(mm_ggufs, tmp_path, capsys):
    """No mmproj: text works, an image is refused with how to add one. An mmproj that is not
    Gemma 4's (here a text model renamed) or is damaged: the same, naming the problem."""
    from gemma4_nb.runtime.gguf_file import GGUFFile

    _, _, files = mm_ggufs
    alone = gemma4_nb.load(model_folder(tmp_path / "alone", files, "f32", projector=False), dtype="fp32",
                           progress=False)
    assert alone.projector is None and alone.config.vision is None
    assert isinstance(alone.chat([{"role": "user", "content": "hi"}], max_new_tokens=3, temperature=0), str)
    with pytest.raises(PromptError, match=r"projector \(mmproj\) file.*put the model's mmproj-\*\.gguf .* beside "
                                          r"the model's \.gguf"):
        alone.chat(conversation(), max_new_tokens=2)

    wrong = model_folder(tmp_path / "wrong", files, "f32", projector=False)
    shutil.copy(files["text-f16"], wrong / "mmproj-not-really.gguf")
    model = gemma4_nb.load(wrong, dtype="fp32", progress=True)
    assert "images and audio are off" in capsys.readouterr().err
    with pytest.raises(PromptError, match=r"its projector cannot be used: .*mmproj-not-really\.gguf: not a projector "
                                          r"file \(its architecture is 'gemma4'"):
        model.chat(conversation(), max_new_tokens=2)

    damaged = model_folder(tmp_path / "damaged", files, "f32")
    proj = damaged / "mmproj-gemma-4-tiny-F32.gguf"
    info = GGUFFile(proj).tensors["v.patch_embd.weight"]
    with open(proj, "r+b") as fh:
        fh.seek(info.offset + 4 * 100)
        fh.write(np.array([np.nan], dtype=np.float32).tobytes())
    model = gemma4_nb.load(damaged, dtype="fp32", progress=False)
    assert isinstance(model.chat([{"role": "user", "content": "hi"}], max_new_tokens=2), str)
    with pytest.raises(PromptError, match=r"v\.patch_embd\.weight holds 1 non-finite"):
        model.chat(conversation(), max_new_tokens=2)


def test_gemma_magic_sends_images_to_a_gguf_with_its_projector(mm_ggufs, tmp_path):
    """In a real kernel: ``%%gemma --image`` on a GGUF model with its projector sends the image;
    on one without, the note says how to add the projector."""
    from test_notebook_kernel import run_cells, text_of

    _, _, files = mm_ggufs
    with_projector = model_folder(tmp_path / "a", files, "f32")
    alone = model_folder(tmp_path / "b", files, "f32", projector=False)
    img = "np.tile(np.arange(96, dtype=np.uint8)[:, None, None], (1, 96, 3))"
    cells = run_cells([
        "%load_ext gemma4_nb",
        f"%gemma model {with_projector}",
        f"import numpy as np\nimg = {img}",
        "%%gemma --image img --max-new-tokens 3 --temperature 0\nWhat does this show?",
        "from gemma4_nb.notebook.copilot import get_copilot\n"
        "from gemma4_nb.runtime.multimodal import image_patches\n"
        "m = get_copilot(get_ipython()).model\n"
        "print('PROMPT', m.last_usage.prompt_tokens, 'IMAGE', image_patches(img).n_tokens, m.projector.name)",
        f"%gemma model {alone}",
        "%%gemma --image img --max-new-tokens 3\nWhat does this show?",
    ], tmp_path)
    out = [text_of(c) for c in cells]
    assert not any(o.get("output_type") == "error" for c in cells for o in c.outputs), out
    assert "not sent" not in out[3], out[3]
    words = out[4].split()
    prompt, image = int(words[words.index("PROMPT") + 1]), int(words[words.index("IMAGE") + 1])
    assert prompt > image > 0 and "mmproj-gemma-4-tiny-F32.gguf" in out[4], out[4]
    assert "1 image(s) not sent: this Gemma 4 GGUF takes text only: no projector (mmproj) file was found" in out[6], \
        out[6]
