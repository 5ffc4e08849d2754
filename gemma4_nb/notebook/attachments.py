"""Images and audio attached to a question: loaded up front, and kept back (with a note) from a
model that cannot take them. Shared by ``%%gemma --image/--audio`` and the chat panels."""

from __future__ import annotations

import os

from ..runtime.media import MediaError, load_audio, load_image


def load_attachment(ref: str, kind: str, namespace: dict):
    """``--image X`` / ``--audio X``: a variable of the notebook, else a file path, loaded now, so
    that a missing or unreadable file is an error before anything is asked."""
    obj = namespace.get(ref, ref) if isinstance(ref, str) else ref
    if isinstance(obj, str) and not os.path.exists(os.path.expanduser(obj)):
        raise MediaError(f"--{kind} {ref}: no such file, and no variable named {ref!r} in the notebook")
    try:
        return load_image(obj) if kind == "image" else load_audio(obj)
    except MediaError as exc:
        raise MediaError(f"--{kind} {ref}: {exc}") from None


def drop_unsupported(copilot, images: list, audios: list) -> tuple[list, list, list[str]]:
    """The images and audio the loaded model can take, and a note for each kind it cannot."""
    notes = []
    backend = copilot.backend
    has_vision = bool(getattr(backend, "supports_images", False))
    has_audio = copilot.model is not None and getattr(copilot.model.config, "audio", None) is not None
    # a Gemma 4 GGUF without a usable projector (mmproj): why, and how to add one
    gguf_note = getattr(copilot.model, "config", None) and copilot.model.config.raw.get("gemma4_nb_media_note")
    if images and not has_vision:
        why = f"this Gemma 4 GGUF takes text only: {gguf_note}" if gguf_note else \
            "this model has no vision encoder (use Gemma 4 for images)"
        notes.append(f"{len(images)} image(s) not sent: {why}")
        images = []
    if audios and not has_audio:
        why = f"this Gemma 4 GGUF takes text only: {gguf_note}" if gguf_note else \
            "this model has no audio encoder (use Gemma 4 for voice questions)"
        notes.append(f"{len(audios)} audio clip(s) not sent: {why}")
        audios = []
    return images, audios, notes
