"""Images and audio into the decoder, against transformers' Gemma4UnifiedForConditionalGeneration."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import gemma4_nb
from gemma4_nb.devtools.tiny import SPECIAL_TOKENS
from gemma4_nb.runtime.media import MediaError, load_audio, load_image
from gemma4_nb.runtime.multimodal import image_patches, target_size

TOKENS = {name: SPECIAL_TOKENS.index(tok) for name, tok in [
    ("image_token_id", "<|image|>"), ("audio_token_id", "<|audio|>"), ("boi_token_id", "<|image>"),
    ("eoi_token_id", "<image|>"), ("boa_token_id", "<|audio>"), ("eoa_token_index", "<audio|>")]}


@pytest.fixture(scope="module")
def mm_checkpoint(tmp_path_factory, tokenizer_dir):
    from conftest import randomize_
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                attention_k_eq_v=True, sliding_window=24, final_logit_softcapping=30.0, max_position_embeddings=2048,
                layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"])
    cfg = Gemma4UnifiedConfig(text_config=text, vision_config=dict(mm_embed_dim=48, output_proj_dims=48, mm_posemb_size=64),
                              audio_config=dict(audio_embed_dim=640), **TOKENS)
    torch.manual_seed(0)
    ref = Gemma4UnifiedForConditionalGeneration(cfg).eval()
    randomize_(ref, seed=5)
    with torch.no_grad():
        ref.model.embed_vision.pos_embedding.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("mm")
    ref.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path, ref


def gradient(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rgba = np.concatenate([gradient(90, 120), np.full((90, 120, 1), 200, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(d / "plot.png")
    t = np.arange(44100) / 44100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t)], -1)
    soundfile.write(d / "note.wav", stereo, 44100)
    soundfile.write(d / "note.flac", stereo, 44100)
    soundfile.write(d / "note.ogg", stereo, 44100)
    return d


def conversation(media_files):
    return [{"role": "user", "content": [
        {"type": "text", "text": "Compare these two plots"},
        {"type": "image", "image": gradient(200, 300), "max_soft_tokens": 70},
        {"type": "image", "image": str(media_files / "plot.png"), "max_soft_tokens": 70},
        {"type": "text", "text": "and answer the question in this voice note:"},
        {"type": "audio", "audio": str(media_files / "note.wav")},
    ]}]


def test_token_sequence_and_soft_tokens_match_transformers(mm_checkpoint, media_files):
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import Gemma4UnifiedAudioFeatureExtractor
    from transformers.models.gemma4_unified.processing_gemma4_unified import get_aspect_ratio_preserving_size

    path, ref = mm_checkpoint
    model = gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False)
    prompt = model.prepare_chat(conversation(media_files))
    ids = torch.tensor(prompt.ids)
    # token counts as the reference processor computes them
    counts = []
    for h, w in [(200, 300), (90, 120)]:
        th, tw = get_aspect_ratio_preserving_size(h, w, 16, 70 * 9, 3)
        counts.append((th // 48) * (tw // 48))
    audio = load_audio(media_files / "note.wav")
    frames = Gemma4UnifiedAudioFeatureExtractor()(np.asarray(audio))["input_features"][0]
    runs, i = [], 0
    while i < len(ids):
        if ids[i] in (TOKENS["image_token_id"], TOKENS["audio_token_id"]):
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            runs.append((int(ids[i]), j - i, int(ids[i - 1]), int(ids[j])))
            i = j
        else:
            i += 1
    assert runs == [(TOKENS["image_token_id"], counts[0], TOKENS["boi_token_id"], TOKENS["eoi_token_id"]),
                    (TOKENS["image_token_id"], counts[1], TOKENS["boi_token_id"], TOKENS["eoi_token_id"]),
                    (TOKENS["audio_token_id"], len(frames), TOKENS["boa_token_id"], TOKENS["eoa_token_index"])]
    # soft tokens: the reference embedders on the same inputs
    imgs = [image_patches(gradient(200, 300), 70), image_patches(str(media_files / "plot.png"), 70)]
    n = max(p.n_tokens for p in imgs)
    pixel_values = torch.zeros(2, n, imgs[0].patches.shape[1])
    positions = torch.full((2, n, 2), -1, dtype=torch.long)
    for k, p in enumerate(imgs):
        pixel_values[k, : p.n_tokens], positions[k, : p.n_tokens] = p.patches, p.positions
    with torch.no_grad():
        ref_img = torch.cat(ref.model.get_image_features(pixel_values, positions).pooler_output)
        ref_aud = ref.model.get_audio_features(torch.from_numpy(frames)[None],
                                               torch.ones(1, len(frames), dtype=torch.bool)).pooler_output[0]
    expected = torch.cat([ref_img, ref_aud])
    assert prompt.soft.shape == expected.shape
    assert (prompt.soft - expected).abs().max().item() <= 1e-5
    # logits of the whole prompt, with the bidirectional image blocks on sliding layers. The masks
    # are the ones transformers' generate() builds for the prefill (its plain forward() differs:
    # it also opens the blocks on full layers and past the sliding window).
    mm_types = torch.zeros_like(ids)
    mm_types[ids == TOKENS["image_token_id"]] = 1
    mm_types[ids == TOKENS["audio_token_id"]] = 3
    masks = type(ref).create_masks_for_generate(ref.config, torch.zeros(1, len(ids), 64), None, None,
                                                torch.arange(len(ids))[None], mm_token_type_ids=mm_types[None])
    with torch.no_grad():
        out = ref(input_ids=ids[None], pixel_values=pixel_values, image_position_ids=positions,
                  input_features=torch.from_numpy(frames)[None], input_features_mask=torch.ones(1, len(frames), dtype=torch.bool),
                  mm_token_type_ids=mm_types[None], attention_mask=masks)
    from gemma4_nb.runtime.decoder import SoftTokens

    got = model.net.forward(ids, model.net.new_cache(), soft=SoftTokens(prompt.soft_mask, prompt.soft, prompt.blocks),
                            outputs="all").logits
    assert (got - out.logits[0]).abs().max().item() <= 1e-4


def test_chunked_prefill_keeps_images_whole_and_matches(mm_checkpoint, media_files):
    path, _ = mm_checkpoint
    a = gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False, prefill_chunk=4096)
    b = gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False, prefill_chunk=7, kv_chunk=8)
    messages = conversation(media_files)
    assert a.chat(messages, temperature=0, max_new_tokens=10) == b.chat(messages, temperature=0, max_new_tokens=10)
    # the same conversation again reuses the cache; a different image is not mistaken for the same one
    b.chat(messages, temperature=0, max_new_tokens=10)
    assert b.last_usage.cached_tokens == b.last_usage.prompt_tokens - 1
    other = conversation(media_files)
    other[0]["content"][1]["image"] = 255 - gradient(200, 300)
    b.chat(other, temperature=0, max_new_tokens=2)
    first_image = b.prepare_chat(other).ids.index(TOKENS["image_token_id"])
    assert b.last_usage.cached_tokens <= first_image


@pytest.mark.parametrize("kind", ["path", "bytes", "pil", "uint8", "float", "gray", "figure", "ipython"])
def test_image_inputs(kind, media_files):
    path = media_files / "plot.png"
    rgb = load_image(path)
    assert rgb.shape == (90, 120, 3) and rgb.dtype == np.uint8
    if kind == "path":
        got = load_image(str(path))
    elif kind == "bytes":
        got = load_image(path.read_bytes())
    elif kind == "pil":
        got = load_image(Image.open(path))
    elif kind == "uint8":
        got = load_image(rgb)
    elif kind == "float":
        got = load_image(rgb.astype(np.float32) / 255.0)
    elif kind == "gray":
        got = load_image(rgb[..., 0])
        assert (got == rgb[..., :1]).all()
        return
    elif kind == "figure":
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot([1, 3, 2])
        got = load_image(fig)
        plt.close(fig)
        assert got.ndim == 3 and got.shape[2] == 3 and got.shape[0] > 100
        return
    else:
        IPyImage = pytest.importorskip("IPython.display").Image

        got = load_image(IPyImage(data=path.read_bytes()))
    assert np.array_equal(got, rgb)
    # RGBA was composited on white: alpha 200 of 255
    raw = np.asarray(Image.open(path))
    expected = np.round(raw[..., :3] * (200 / 255) + 255 * (55 / 255))
    assert np.abs(rgb.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("kind", ["wav", "flac", "ogg", "bytes", "array", "tuple", "ipython"])
def test_audio_inputs_are_mono_16k(kind, media_files):
    reference = load_audio(media_files / "note.wav")
    assert reference.dtype == np.float32 and len(reference) == 16000
    if kind in ("wav", "flac", "ogg"):
        got = load_audio(media_files / f"note.{kind}")
        tolerance = 0.05 if kind == "ogg" else 1e-3  # ogg is lossy
    elif kind == "bytes":
        got, tolerance = load_audio((media_files / "note.wav").read_bytes()), 1e-3
    elif kind in ("array", "tuple"):
        data, rate = soundfile.read(media_files / "note.wav")
        got = load_audio(data, sampling_rate=rate) if kind == "array" else load_audio((data, rate))
        tolerance = 1e-3
    else:
        Audio = pytest.importorskip("IPython.display").Audio

        data, rate = soundfile.read(media_files / "note.wav")
        got, tolerance = load_audio(Audio(data.T, rate=rate, normalize=False)), 1e-3  # WAV int16 inside
    assert got.shape == reference.shape
    assert np.abs(got - reference).max() < tolerance
    # stereo was mixed to mono: a 440 Hz and a 660 Hz tone at 0.3 and 0.2 -> mean of both
    spectrum = np.abs(np.fft.rfft(got))
    assert {int(np.argmax(spectrum[:500])), int(np.argmax(spectrum[500:]) + 500)} == {440, 660}


def test_bad_media_give_clear_errors_and_the_session_goes_on(mm_checkpoint, media_files, tmp_path):
    path, _ = mm_checkpoint
    model = gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False)

    def ask(part):
        return model.chat([{"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}],
                          max_new_tokens=2, temperature=0)

    with pytest.raises(MediaError, match="not an image format that can be read"):
        ask({"type": "image", "image": b"definitely not an image"})
    with pytest.raises(MediaError, match="cannot be read"):
        ask({"type": "image", "image": b"\x89PNG\r\n\x1a\n garbage"})
    (tmp_path / "cut.png").write_bytes((media_files / "plot.png").read_bytes()[:200])
    with pytest.raises(MediaError, match="cut.png cannot be decoded"):
        ask({"type": "image", "image": str(tmp_path / "cut.png")})
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MediaError, match=r"unsupported image type \.txt"):
        ask({"type": "image", "image": str(tmp_path / "notes.txt")})
    with pytest.raises(MediaError, match="has no samples"):
        ask({"type": "audio", "audio": np.zeros(0, np.float32), "sampling_rate": 16000})
    with pytest.raises(MediaError, match="is silent"):
        ask({"type": "audio", "audio": np.zeros(16000, np.float32), "sampling_rate": 16000})
    with pytest.raises(MediaError, match="needs its sampling rate"):
        ask({"type": "audio", "audio": np.ones(100, np.float32)})
    huge = tmp_path / "huge.png"
    Image.new("1", (30000, 30000)).save(huge)  # 900 MP, a small file
    with pytest.raises(MediaError, match=r"30000x30000 \(900 MP\); the limit is 100 MP"):
        ask({"type": "image", "image": str(huge)})
    with pytest.raises(gemma4_nb.Gemma4Error, match="placeholders"):
        model.chat([{"role": "user", "content": "<|image|> what is this?"}], max_new_tokens=2)
    assert isinstance(ask({"type": "image", "image": gradient(60, 60), "max_soft_tokens": 70}), str)


def test_text_only_model_refuses_media(tiny_dir):
    model = gemma4_nb.load(tiny_dir, progress=False)
    with pytest.raises(gemma4_nb.Gemma4Error, match="no image embedder|takes text only"):
        model.chat([{"role": "user", "content": [{"type": "image", "image": gradient(50, 50)}]}])


def test_resize_targets():
    assert target_size(1080, 1920, 280) == (576, 1056)  # 12 x 22 = 264 patches <= 280
    assert target_size(336, 480, 70) == (336, 480)  # already on the grid: no resize
    assert target_size(10, 5000, 70) == (48, 3360)  # extreme aspect ratio: one row, capped
    p = image_patches(gradient(100, 100), 70)
    assert p.patches.shape == (64, 48 * 48 * 3) and float(p.patches.max()) <= 1.0
    assert p.positions[:3].tolist() == [[0, 0], [1, 0], [2, 0]] and p.positions[-1].tolist() == [7, 7]


def test_copilot_shows_open_figures_to_a_vision_model(mm_checkpoint):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from IPython.core.interactiveshell import InteractiveShell

    from gemma4_nb.notebook.copilot import Copilot
    from gemma4_nb.notebook.snapshot import FigureMemory

    path, _ = mm_checkpoint
    shell = InteractiveShell.instance()
    copilot = Copilot(shell)
    copilot.settings.model = str(path)
    copilot.settings.max_new_tokens = 3
    copilot.ensure_model()
    plt.close("all")
    FigureMemory.of(shell).entries.clear()  # figures other tests drew in this shared shell
    without = copilot.model.prepare_chat(copilot.prepare("what does the plot show?").messages)
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 3, 2])
    with_fig = copilot.model.prepare_chat(copilot.prepare("what does the plot show?").messages)
    plt.close("all")
    assert without.soft_mask is None
    assert int(with_fig.soft_mask.sum()) > 0 and TOKENS["image_token_id"] in with_fig.ids
    assert copilot.ask("what does the plot show?").answer is not None
