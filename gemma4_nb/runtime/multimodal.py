"""Encoder-free multimodal input: images and audio become soft tokens of the decoder.

Images: an aspect-preserving resize to a soft-token budget, 48x48-pixel patches (flattened HWC,
row-major), and the vision embedder. Audio: 640-sample frames of 16 kHz audio and one projection.
The chat prompt's ``<|image|>``/``<|audio|>`` placeholders expand to BOI + one token per soft
token + EOI (BOA/EOA for audio), as the reference processor does.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PromptError
from ..kernels import torch_ops as ops
from .config import ModelConfig
from .media import MediaError, load_audio, load_image

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_IMAGE_BUDGET = 280
TEACHER_PATCH = 16  # the reference resizes to multiples of pooling * teacher patch = 48 px


# -- images ----------------------------------------------------------------------------------

def target_size(height: int, width: int, budget: int, patch: int = TEACHER_PATCH, pooling: int = 3) -> tuple[int, int]:
    """The largest size with the image's aspect ratio whose 48-px grid holds at most ``budget`` patches."""
    max_patches = budget * pooling * pooling
    factor = math.sqrt(max_patches * patch * patch / (height * width))
    side = pooling * patch
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    longest = (max_patches // pooling**2) * side
    if th == 0 and tw == 0:
        raise MediaError(f"image of {width}x{height} cannot be resized to whole {side}-pixel patches")
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:
        tw, th = side, min(int(math.floor(height / width)) * side, longest)
    return th, tw


@dataclass
class ImagePatches:
    patches: torch.Tensor  # float32 [n, 48*48*3], values in [0, 1]
    positions: torch.Tensor  # long [n, 2]: (x, y) of each patch in the grid

    @property
    def n_tokens(self) -> int:
        return self.patches.shape[0]


def image_patches(image, budget: int = DEFAULT_IMAGE_BUDGET, side: int = 48) -> ImagePatches:
    """Resize (bicubic, antialiased, in 8 bits), rescale to [0, 1], cut into patches."""
    if budget not in SOFT_TOKEN_BUDGETS:
        raise MediaError(f"image token budget {budget} is not supported; use one of {SOFT_TOKEN_BUDGETS}")
    rgb = load_image(image)
    h, w = rgb.shape[:2]
    th, tw = target_size(h, w, budget)
    pixels = torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1)  # [3, H, W] uint8
    if (th, tw) != (h, w):
        # PyTorch's 8-bit antialiased bicubic kernel: what torchvision (the reference) runs on CPU
        pixels = F.interpolate(pixels[None], size=(th, tw), mode="bicubic", antialias=True, align_corners=False)[0]
    x = pixels * (1.0 / 255.0)
    gh, gw = th // side, tw // side
    patches = x.reshape(3, gh, side, gw, side).permute(1, 3, 2, 4, 0).reshape(gh * gw, side * side * 3)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return ImagePatches(patches.contiguous(), torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1))


# -- audio -----------------------------------------------------------------------------------

def audio_frames(audio, sampling_rate: int | None = None, samples_per_token: int = 640) -> torch.Tensor:
    """Mono 16 kHz samples, zero-padded to whole frames: ``[n_tokens, samples_per_token]`` float32."""
    samples = load_audio(audio, sampling_rate)
    pad = (-len(samples)) % samples_per_token
    if pad:
        samples = np.pad(samples, (0, pad))
    return torch.from_numpy(np.ascontiguousarray(samples.reshape(-1, samples_per_token), dtype=np.float32))


# -- embedders -------------------------------------------------------------------------------

class Embedders:
    """The image and audio embedders of a checkpoint (absent parts are None)."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.vision = cfg.vision
        self.audio = cfg.audio
        self.w = weights

    def embed_images(self, items: list[ImagePatches], dtype: torch.dtype, device) -> torch.Tensor:
        v, w, e = self.vision, self.w, "model.vision_embedder."
        patches = torch.cat([i.patches for i in items]).to(device=device, dtype=dtype)
        positions = torch.cat([i.positions for i in items]).to(device)
        if int(positions.max()) >= v.posemb_size:
            raise MediaError(f"image grid of {int(positions.max()) + 1} patches per side exceeds the position table ({v.posemb_size})")
        h = F.layer_norm(patches, (v.patch_dim,), w[e + "patch_ln1.weight"], w[e + "patch_ln1.bias"], v.layer_norm_eps)
        h = F.linear(h, w[e + "patch_dense.weight"], w[e + "patch_dense.bias"])
        h = F.layer_norm(h, (v.embed_dim,), w[e + "patch_ln2.weight"], w[e + "patch_ln2.bias"], v.layer_norm_eps)
        table = w[e + "pos_embedding"]
        h = h + (table[positions[:, 0], 0] + table[positions[:, 1], 1])
        h = F.layer_norm(h, (v.embed_dim,), w[e + "pos_norm.weight"], w[e + "pos_norm.bias"], v.layer_norm_eps)
        h = ops.rms_norm(h, None, v.rms_norm_eps)
        return ops.linear(h, w["model.embed_vision.embedding_projection.weight"])

    def embed_audio(self, frames: list[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
        x = torch.cat(frames).to(device=device, dtype=dtype)
        x = ops.rms_norm(x, None, self.audio.rms_norm_eps)
        return ops.linear(x, self.w["model.embed_audio.embedding_projection.weight"])


# -- prompts ---------------------------------------------------------------------------------

@dataclass
class PreparedPrompt:
    """Token ids plus what the decoder needs for the media in them."""

    ids: list[int]
    keys: list  # prefix-cache identity per position: the token id, or (media digest, index)
    soft_mask: torch.Tensor | None = None  # bool [T]: positions whose embedding is replaced
    soft: torch.Tensor | None = None  # [n_soft, hidden] in position order
    blocks: torch.Tensor | None = None  # long [T]: image block id (bidirectional on sliding layers), -1 elsewhere
    atomic: list[tuple[int, int]] = field(default_factory=list)  # spans a prefill chunk must not split

    def span_soft(self, start: int, stop: int):
        """(mask, embeddings, blocks) for positions ``start:stop``, or Nones without media."""
        if self.soft_mask is None:
            return None, None, None
        mask = self.soft_mask[start:stop]
        first = int(self.soft_mask[:start].sum())
        return mask, self.soft[first : first + int(mask.sum())], self.blocks[start:stop]


def collect_media(messages: list[dict]) -> tuple[list, list]:
    """Image and audio parts of the messages, in order (transformers' content-part format)."""
    images, audios = [], []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                raise PromptError(f"content parts must be dicts like {{'type': 'text', 'text': ...}}, got {part!r:.60}")
            kind = part.get("type")
            if kind == "image":
                src = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)
                if src is None:
                    raise PromptError("an image part needs the image: {'type': 'image', 'image': <path, bytes, PIL, array, figure>}")
                images.append((src, int(part.get("max_soft_tokens", DEFAULT_IMAGE_BUDGET))))
            elif kind == "audio":
                src = next((part[k] for k in ("audio", "path", "url") if part.get(k) is not None), None)
                if src is None:
                    raise PromptError("an audio part needs the audio: {'type': 'audio', 'audio': <path, bytes, array>, 'sampling_rate': ...}")
                audios.append((src, part.get("sampling_rate")))
            elif kind not in ("text", None):
                raise PromptError(f"content part type {kind!r} is not supported (text, image, audio)")
    return images, audios


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()[:16]


def prepare_prompt(text: str, images: list, audios: list, tokenizer, cfg: ModelConfig, embedders: Embedders | None,
                   dtype: torch.dtype, device) -> PreparedPrompt:
    """Expand the rendered prompt's media placeholders, tokenize, and embed the media."""
    tok_ids = cfg.media_tokens
    if not images and not audios:
        ids = tokenizer.encode(text)
        if tok_ids is not None and (tok_ids.image in ids or tok_ids.audio in ids):
            raise PromptError("the prompt has image or audio placeholders but no image or audio was given; "
                              "pass media as content parts: {'type': 'image', 'image': ...}")
        return PreparedPrompt(ids, list(ids))
    if tok_ids is None or embedders is None:
        note = cfg.raw.get("gemma4_nb_media_note")
        if note:  # a Gemma 4 GGUF without a usable projector (load() says why)
            raise PromptError(f"this Gemma 4 GGUF takes text only as loaded: llama.cpp keeps images and audio in a "
                              f"separate projector (mmproj) file, and {note}. Then load the model again, or remove "
                              "the image and audio parts")
        raise PromptError(f"this model ({cfg.model_type}) takes text only; remove the image and audio parts")
    if images and cfg.vision is None:
        raise PromptError("this checkpoint has no image embedder; remove the image parts")
    if audios and cfg.audio is None:
        raise PromptError("this checkpoint has no audio embedder; remove the audio parts")
    token = {k: tokenizer.hf.id_to_token(getattr(tok_ids, k)) for k in ("image", "boi", "eoi", "audio", "boa", "eoa")}
    found = re.findall(re.escape(token["image"]) + "|" + re.escape(token["audio"]), text)
    n_img, n_aud = found.count(token["image"]), found.count(token["audio"])
    if (n_img, n_aud) != (len(images), len(audios)):
        raise PromptError(f"the prompt has {n_img} image and {n_aud} audio placeholders for {len(images)} images "
                          f"and {len(audios)} audio clips")
    processed_images = [image_patches(src, budget) for src, budget in images]
    frames = [audio_frames(src, rate, cfg.audio.samples_per_token) for src, rate in audios]
    queue_i, queue_a = iter(processed_images), iter(frames)

    def expand(match: re.Match) -> str:
        if match.group(0) == token["image"]:
            return token["boi"] + token["image"] * next(queue_i).n_tokens + token["eoi"]
        return token["boa"] + token["audio"] * next(queue_a).shape[0] + token["eoa"]

    expanded = re.sub(re.escape(token["image"]) + "|" + re.escape(token["audio"]), expand, text)
    ids = tokenizer.encode(expanded)
    t = torch.tensor(ids)
    is_img, is_aud = t == tok_ids.image, t == tok_ids.audio
    if int(is_img.sum()) != sum(p.n_tokens for p in processed_images) or int(is_aud.sum()) != sum(f.shape[0] for f in frames):
        raise PromptError("the tokenizer split the media placeholders; the tokenizer does not match this model")
    hidden = cfg.hidden_size
    soft = torch.empty((int(is_img.sum() + is_aud.sum()), hidden), dtype=dtype, device=device)
    order = torch.cumsum((is_img | is_aud).long(), 0) - 1  # index into `soft` per soft position
    if processed_images:
        soft[order[is_img].to(device)] = embedders.embed_images(processed_images, dtype, device)
    if frames:
        soft[order[is_aud].to(device)] = embedders.embed_audio(frames, dtype, device)
    # image blocks: bidirectional attention on sliding layers, never split across prefill chunks
    starts = is_img & ~torch.cat([torch.tensor([False]), is_img[:-1]])
    blocks = torch.where(is_img, torch.cumsum(starts.long(), 0) - 1, torch.full_like(t, -1))
    atomic, keys = [], list(ids)
    pos = 0
    media = [(p.n_tokens, _digest(p.patches)) for p in processed_images]
    media_a = [(f.shape[0], _digest(f)) for f in frames]
    mi = ma = 0
    while pos < len(ids):
        if is_img[pos] or is_aud[pos]:
            n, digest = media[mi] if is_img[pos] else media_a[ma]
            if is_img[pos]:
                mi += 1
                atomic.append((pos, pos + n))
            else:
                ma += 1
            for j in range(n):
                keys[pos + j] = (digest, j)
            pos += n
        else:
            pos += 1
    return PreparedPrompt(ids, keys, is_img | is_aud, soft, blocks, atomic)
