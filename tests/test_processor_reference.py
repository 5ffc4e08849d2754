"""Image and audio preprocessing against transformers' own Gemma4UnifiedProcessor.

That processor resizes with torchvision, which has no build for the CPU torch 2.13 that CI
installs, so this file runs where torchvision imports (the GPU machine) and is skipped elsewhere.
The model-side parity (soft tokens, logits) runs everywhere in test_multimodal.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision", reason="transformers' Gemma4Unified image processor needs torchvision")

import gemma4_nb  # noqa: E402
from gemma4_nb.runtime.multimodal import audio_frames, image_patches  # noqa: E402
from gemma4_nb.runtime.tokenizer import Tokenizer  # noqa: E402


def photo(h, w, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * np.sin(x / 7.0)], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    from transformers import AutoTokenizer, Gemma4UnifiedProcessor
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import Gemma4UnifiedAudioFeatureExtractor
    from transformers.models.gemma4_unified.image_processing_gemma4_unified import Gemma4UnifiedImageProcessor
    from transformers.models.gemma4_unified.video_processing_gemma4_unified import Gemma4UnifiedVideoProcessor

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return Gemma4UnifiedProcessor(feature_extractor=Gemma4UnifiedAudioFeatureExtractor(),
                                  image_processor=Gemma4UnifiedImageProcessor(max_soft_tokens=280),
                                  tokenizer=tok, video_processor=Gemma4UnifiedVideoProcessor(),
                                  chat_template=Tokenizer(tokenizer_dir).chat_template)


@pytest.mark.parametrize("shape", [(1080, 1920), (480, 640), (333, 1000), (50, 50), (300, 29)])
def test_image_patches_match_the_reference_processor(shape, processor):
    from PIL import Image

    img = photo(*shape, seed=shape[0])
    ref = processor.image_processor(Image.fromarray(img), return_tensors="pt")
    ours = image_patches(img, 280)
    n = int(ref["num_soft_tokens_per_image"][0])
    assert ours.n_tokens == n
    assert torch.equal(ours.positions, ref["image_position_ids"][0, :n])
    diff = (ours.patches - ref["pixel_values"][0, :n]).abs().max().item()
    assert diff <= 1 / 255 + 1e-6, diff  # at most one 8-bit level after the bicubic resize
    assert (ours.patches - ref["pixel_values"][0, :n]).abs().mean().item() < 1e-3


def test_prompt_token_sequence_matches_the_reference_processor(processor, tokenizer_dir):
    from PIL import Image

    images = [photo(400, 600, 1), photo(900, 300, 2)]
    clip = 0.1 * np.sin(np.linspace(0, 2000, 16000 * 3)).astype(np.float32)
    messages = [{"role": "user", "content": [{"type": "text", "text": "two plots"}, {"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "and a voice note"}, {"type": "audio"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = processor(text=text, images=[[Image.fromarray(i) for i in images]], audio=[clip], return_tensors="pt",
                    add_special_tokens=False)  # the template already wrote <bos>
    from gemma4_nb.devtools.tiny import tiny_config
    from gemma4_nb.runtime.config import parse_config
    from gemma4_nb.runtime.multimodal import prepare_prompt

    cfg_dict = tiny_config()
    cfg_dict.update(image_token_id=17, audio_token_id=18, boi_token_id=19, eoi_token_id=20, boa_token_id=21, eoa_token_index=22,
                    vision_config={"mm_embed_dim": 48, "output_proj_dims": 48, "mm_posemb_size": 64},
                    audio_config={"audio_embed_dim": 640})
    cfg = parse_config(cfg_dict)
    tok = Tokenizer(tokenizer_dir)
    ours_text = tok.render_chat(messages)
    assert ours_text == text

    class NoEmbed:  # only the token layout is compared here
        def embed_images(self, items, dtype, device):
            return torch.zeros(sum(i.n_tokens for i in items), cfg.hidden_size)

        def embed_audio(self, frames, dtype, device):
            return torch.zeros(sum(f.shape[0] for f in frames), cfg.hidden_size)

    prompt = prepare_prompt(text, [(i, 280) for i in images], [(clip, 16000)], tok, cfg, NoEmbed(), torch.float32, "cpu")
    assert prompt.ids == ref["input_ids"][0].tolist()
    frames = audio_frames(clip, 16000)
    assert torch.equal(frames, ref["input_features"][0][: frames.shape[0]])
