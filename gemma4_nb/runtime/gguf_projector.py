"""Gemma 4's image and audio embedders from llama.cpp's projector file (``mmproj*.gguf``, an
Ollama model's projector layer): architecture ``clip``, projector types ``gemma4uv`` (images) and
``gemma4ua`` (audio), as ``convert_hf_to_gguf.py --mmproj`` writes them for
``Gemma4UnifiedForConditionalGeneration``.

Gemma 4 is encoder-free, so the file holds the embedders themselves; they are read back into
the safetensors checkpoint's names and layouts (:func:`.checkpoint.media_tensors`), undoing what
the converter changed for ggml:

- ``v.patch_embd.weight`` (``patch_dense``) and ``v.patch_norm.1`` (``patch_ln1``) have their
  patch-pixel axis reordered from the checkpoint's HWC (RGBRGB...) to ggml's im2col CHW order;
- ``v.position_embd.weight`` is the ``[positions, 2, dim]`` table stored as ``[2, positions, dim]``;
- ``pos_norm`` is stored as ``v.patch_norm.3``.

The config comes from the tensors' shapes (the 48-pixel patch from ``patch_embd``'s width, the
position table's size, the projection widths) and the RMSNorm epsilon from
``clip.vision.attention.layer_norm_epsilon`` (the value llama.cpp uses); the media token ids from
the model's vocabulary. The file is small (tens of MB for 12B): it is read at every load,
nothing is cached.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, Gemma4Error
from .config import AudioSpec, MediaTokens, ModelConfig, VisionSpec
from .gguf_file import PROJECTOR_ARCH, GGUFFile

VISION_PROJECTOR, AUDIO_PROJECTOR = "gemma4uv", "gemma4ua"
ADD_PROJECTOR = ("put the model's mmproj-*.gguf (from the same GGUF repository, e.g. mmproj-F16.gguf) in the "
                 "folder beside the model's .gguf, or for Ollama pull a Gemma 4 model whose manifest has a "
                 "projector layer")

# the media tokens of Gemma 4's vocabulary (MediaTokens field -> token)
MEDIA_TOKENS = {"image": "<|image|>", "boi": "<|image>", "eoi": "<image|>",
                "audio": "<|audio|>", "boa": "<|audio>", "eoa": "<audio|>"}

V = "model.vision_embedder."
# GGUF name -> checkpoint name
TENSOR_NAMES = {
    "v.patch_norm.1.weight": V + "patch_ln1.weight", "v.patch_norm.1.bias": V + "patch_ln1.bias",
    "v.patch_embd.weight": V + "patch_dense.weight", "v.patch_embd.bias": V + "patch_dense.bias",
    "v.patch_norm.2.weight": V + "patch_ln2.weight", "v.patch_norm.2.bias": V + "patch_ln2.bias",
    "v.position_embd.weight": V + "pos_embedding",
    "v.patch_norm.3.weight": V + "pos_norm.weight", "v.patch_norm.3.bias": V + "pos_norm.bias",
    "mm.input_projection.weight": "model.embed_vision.embedding_projection.weight",
    "mm.a.input_projection.weight": "model.embed_audio.embedding_projection.weight",
}
VISION_TENSORS = [n for n in TENSOR_NAMES if n.startswith(("v.", "mm.input"))]
AUDIO_TENSORS = ["mm.a.input_projection.weight"]


@dataclass(frozen=True)
class Projector:
    """An mmproj file readable as Gemma 4's embedders: what it adds to the config, and how to
    read its weights."""

    path: Path
    vision: VisionSpec | None
    audio: AudioSpec | None
    media_tokens: MediaTokens

    def config_for(self, cfg: ModelConfig) -> ModelConfig:
        """The text model's config with this projector's image and audio embedders."""
        return dataclasses.replace(cfg, vision=self.vision, audio=self.audio, media_tokens=self.media_tokens,
                                   raw=cfg.raw | {"gemma4_nb_projector": str(self.path)})

    def weights(self, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        """The embedders' tensors under the checkpoint's names and layouts, in ``dtype``."""
        from .checkpoint import check_finite

        g = GGUFFile(self.path)
        names = (VISION_TENSORS if self.vision else []) + (AUDIO_TENSORS if self.audio else [])
        out = {}
        for name in names:
            info = g.tensors[name]
            g.check_type(info)
            t = g.tensor(info)
            check_finite(name, t, self.path)
            out[TENSOR_NAMES[name]] = _checkpoint_layout(name, t).to(dtype).to(device)
        return out


def _pixel_order(side: int) -> torch.Tensor:
    """For each position of ggml's CHW patch vector, the checkpoint's HWC index (the converter's
    ``perm``): the file's column ``i`` is the checkpoint's column ``perm[i]``."""
    i = torch.arange(side * side * 3)
    ch, row, col = i // (side * side), (i % (side * side)) // side, i % side
    return row * side * 3 + col * 3 + ch


def _checkpoint_layout(name: str, t: torch.Tensor) -> torch.Tensor:
    if name in ("v.patch_embd.weight", "v.patch_norm.1.weight", "v.patch_norm.1.bias"):
        side = round((t.shape[-1] // 3) ** 0.5)
        out = torch.empty_like(t)
        out[..., _pixel_order(side)] = t  # back from CHW to HWC
        return out
    if name == "v.position_embd.weight":
        return t.permute(1, 0, 2).contiguous()  # [2, positions, dim] -> [positions, 2, dim]
    return t


def _epsilon(md: dict, key: str) -> float:
    """An epsilon stored as float32, as the config wrote it (1e-6, not 9.99999997e-07)."""
    value = md.get(key, 1e-6)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 < value < 1:
        return 1e-6
    return float(str(np.float32(value)))  # the shortest decimal that rounds to the stored float32


def open_projector(path: Path, cfg: ModelConfig, token_to_id) -> Projector:
    """The projector at ``path`` for the text model ``cfg`` (its header read and checked; the
    weights are read by :meth:`Projector.weights`). ``token_to_id``: the model tokenizer's lookup.
    Raises :class:`Gemma4Error` with the reason when the file cannot serve this model."""
    g = GGUFFile(path)
    md, tensors = g.metadata, g.tensors
    if g.architecture != PROJECTOR_ARCH:
        raise CheckpointError(f"{path}: not a projector file (its architecture is {g.architecture!r}, expected "
                              f"{PROJECTOR_ARCH!r} as llama.cpp's mmproj files have)")
    kinds = {md.get("clip.projector_type"), md.get("clip.vision.projector_type"), md.get("clip.audio.projector_type")}
    kinds.discard(None)
    if not kinds & {VISION_PROJECTOR, AUDIO_PROJECTOR}:
        shown = ", ".join(sorted(map(str, kinds))) or "none"
        raise CheckpointError(f"{path}: its projector type ({shown}) is not Gemma 4 12B's ({VISION_PROJECTOR}, "
                              f"{AUDIO_PROJECTOR}); use the mmproj file that comes with this model")
    hidden = cfg.hidden_size

    def shape(name: str, want_rows: int | None = None) -> tuple[int, ...]:
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name} is missing; the projector file is incomplete, "
                                  "convert or download it again")
        s = tensors[name].shape
        if want_rows is not None and (len(s) != 2 or s[0] != want_rows):
            raise CheckpointError(f"{path}: {name} has shape {list(s)}, but this model's hidden size is {hidden}: "
                                  "the projector belongs to another model; use the mmproj file of this one")
        return s

    vision = audio = None
    if VISION_PROJECTOR in kinds:
        proj = shape("mm.input_projection.weight", hidden)
        embed, patch_dim = shape("v.patch_embd.weight")
        side = round((patch_dim // 3) ** 0.5)
        table = shape("v.position_embd.weight")
        expected = {"v.patch_norm.1.weight": (patch_dim,), "v.patch_norm.1.bias": (patch_dim,),
                    "v.patch_embd.bias": (embed,), "v.patch_norm.2.weight": (embed,), "v.patch_norm.2.bias": (embed,),
                    "v.patch_norm.3.weight": (embed,), "v.patch_norm.3.bias": (embed,)}
        wrong = [f"{n} {list(shape(n))}" for n, s in expected.items() if tuple(shape(n)) != s]
        if side * side * 3 != patch_dim or len(table) != 3 or table[0] != 2 or table[2] != embed \
                or proj[1] != embed or wrong:
            raise CheckpointError(f"{path}: the image embedder's tensors do not fit together (patch_embd "
                                  f"{[embed, patch_dim]}, position_embd {list(table)}, input_projection {list(proj)}"
                                  f"{'; ' + ', '.join(wrong) if wrong else ''}); convert or download it again")
        vision = VisionSpec(patch_size=side, embed_dim=embed, posemb_size=table[1], proj_dim=proj[1],
                            rms_norm_eps=_epsilon(md, "clip.vision.attention.layer_norm_epsilon"))
    if AUDIO_PROJECTOR in kinds:
        samples = shape("mm.a.input_projection.weight", hidden)[1]
        audio = AudioSpec(samples_per_token=samples, rms_norm_eps=_epsilon(md, "clip.audio.attention.layer_norm_epsilon"))
    ids = {k: token_to_id(t) for k, t in MEDIA_TOKENS.items()}
    missing = [MEDIA_TOKENS[k] for k, v in ids.items() if v is None]
    if missing:
        raise Gemma4Error(f"{path}: the model's vocabulary has no {', '.join(missing)} token, which images and "
                          "audio need: this projector is not for this model")
    return Projector(Path(path), vision, audio, MediaTokens(**ids))


def attach_projector(path: Path | None, cfg: ModelConfig, token_to_id) -> tuple[Projector | None, str]:
    """The projector for a Gemma 4 GGUF model, or None with a one-line note saying why images and
    audio are off (no projector found, or one this runtime cannot use)."""
    if path is None:
        return None, f"no projector (mmproj) file was found for this GGUF; to add images and audio, {ADD_PROJECTOR}"
    try:
        return open_projector(path, cfg, token_to_id), ""
    except Gemma4Error as exc:
        return None, f"its projector cannot be used: {exc}"
