"""Images and audio from whatever a notebook user has at hand, as plain arrays.

Images become ``uint8`` RGB arrays ``[H, W, 3]``; audio becomes mono ``float32`` at 16 kHz.
Every failure is a :class:`MediaError` that names the input and what to do; memory stays
bounded (huge images are refused from their header, before any pixel is decoded).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from ..errors import Gemma4Error

SAMPLING_RATE = 16_000
MAX_IMAGE_PIXELS = 100_000_000  # 100 MP: larger images are refused, not decoded
MAX_AUDIO_SECONDS = 30 * 60
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif"}


class MediaError(Gemma4Error):
    """An image or audio input that cannot be used."""


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:  # no permission, a file that vanished, a device error
        raise MediaError(f"cannot read {path} ({exc.strerror or exc})") from None


def _describe(obj) -> str:
    if isinstance(obj, (str, os.PathLike)):
        return str(obj)
    if isinstance(obj, (bytes, bytearray)):
        return f"{len(obj)} bytes"
    return type(obj).__name__


# -- images ----------------------------------------------------------------------------------

def _from_pil(img, what: str) -> np.ndarray:
    from PIL import Image

    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise MediaError(f"image {what} is {w}x{h} ({w * h / 1e6:.0f} MP); the limit is "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP: downscale it first")
    if w == 0 or h == 0:
        raise MediaError(f"image {what} is empty ({w}x{h})")
    try:
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")  # transparency composited on white, as a viewer shows it
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"image {what} cannot be decoded ({exc}); the file may be truncated or corrupt") from None


def _open_image_bytes(data: bytes, what: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # our own limit applies, from the header, before decoding
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise MediaError(f"{what} is not an image format that can be read (PNG, JPEG, GIF, BMP, WebP, TIFF)") from None
    except (OSError, ValueError) as exc:
        raise MediaError(f"image {what} cannot be read ({exc})") from None
    return _from_pil(img, what)


def _from_array(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise MediaError(f"image array {what} has shape {arr.shape}; expected [H, W], [H, W, 3] or [H, W, 4] (HWC)")
    if arr.shape[0] * arr.shape[1] > MAX_IMAGE_PIXELS:
        raise MediaError(f"image array {what} is {arr.shape[1]}x{arr.shape[0]}; the limit is "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP: downscale it first")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise MediaError(f"image array {what} has dtype {arr.dtype}; use uint8 (0-255) or float (0-1)")
        if np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise MediaError(f"image array {what} contains NaN or infinite values")
            arr = np.clip(arr, 0.0, 1.0) * 255.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        arr = np.round(arr[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(arr)


def load_image(obj) -> np.ndarray:
    """A file path, bytes, PIL image, numpy array (HWC, uint8 or float in [0, 1]), matplotlib
    figure or IPython ``Image`` as a ``uint8`` RGB array ``[H, W, 3]``."""
    what = _describe(obj)
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj).expanduser()
        if not path.is_file():
            raise MediaError(f"image file {path} does not exist")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise MediaError(f"{path.name}: unsupported image type {path.suffix or '(none)'}; "
                             f"use one of {', '.join(sorted(IMAGE_SUFFIXES))}")
        return _open_image_bytes(_read(path), str(path))
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return _open_image_bytes(bytes(obj), what)
    if isinstance(obj, np.ndarray):
        return _from_array(obj, what)
    kind = type(obj).__module__ + "." + type(obj).__name__
    if kind.startswith("PIL."):
        return _from_pil(obj, what)
    if hasattr(obj, "savefig") and hasattr(obj, "dpi"):  # matplotlib Figure
        buf = io.BytesIO()
        obj.savefig(buf, format="png", dpi=100, bbox_inches="tight", facecolor="white")
        return _open_image_bytes(buf.getvalue(), "matplotlib figure")
    if kind == "IPython.core.display.Image":
        data = obj.data if obj.data is not None else (Path(obj.filename).read_bytes() if obj.filename else None)
        if data is None:
            raise MediaError("IPython Image has neither data nor a filename (URLs are not fetched: the copilot is offline)")
        return _open_image_bytes(data, "IPython Image")
    raise MediaError(f"cannot use a {kind} as an image; pass a path, bytes, a PIL image, a numpy array, "
                     "a matplotlib figure or an IPython Image")


# -- audio -----------------------------------------------------------------------------------

def _decode_audio(data: bytes, what: str) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError, ValueError, TypeError) as exc:
        raise MediaError(f"audio {what} cannot be decoded ({exc}); use WAV, FLAC or OGG") from None
    return samples, int(rate)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLING_RATE) -> np.ndarray:
    """High-quality resampling (soxr)."""
    if rate == target:
        return samples.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(samples, rate, target, quality="HQ").astype(np.float32)


def load_audio(obj, sampling_rate: int | None = None) -> np.ndarray:
    """A file path (WAV, FLAC, OGG), bytes, a numpy array with its ``sampling_rate``, a
    ``(array, rate)`` tuple or an IPython ``Audio`` as mono float32 at 16 kHz."""
    what = _describe(obj)
    kind = type(obj).__module__ + "." + type(obj).__name__
    if kind == "IPython.lib.display.Audio":
        obj = obj.data  # WAV bytes (IPython encodes arrays as WAV)
        what = "IPython Audio"
    if isinstance(obj, tuple) and len(obj) == 2 and np.isscalar(obj[1]):
        obj, sampling_rate = obj
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj).expanduser()
        if not path.is_file():
            raise MediaError(f"audio file {path} does not exist")
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            raise MediaError(f"{path.name}: unsupported audio type {path.suffix or '(none)'}; use WAV, FLAC or OGG")
        samples, rate = _decode_audio(_read(path), str(path))
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        samples, rate = _decode_audio(bytes(obj), what)
    elif isinstance(obj, (np.ndarray, list)):
        samples = np.asarray(obj)
        if sampling_rate is None:
            raise MediaError("an audio array needs its sampling rate: pass sampling_rate=... (or an (array, rate) tuple)")
        rate = int(sampling_rate)
        if samples.ndim == 1:
            samples = samples[:, None]
        elif samples.ndim == 2 and samples.shape[0] < samples.shape[1] and samples.shape[0] <= 8:
            samples = samples.T  # [channels, samples] -> [samples, channels]
        elif samples.ndim != 2:
            raise MediaError(f"audio array has shape {samples.shape}; expected [samples] or [samples, channels]")
        if np.issubdtype(samples.dtype, np.integer):
            samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max)
        samples = samples.astype(np.float32)
        if not np.isfinite(samples).all():
            raise MediaError("audio array contains NaN or infinite values")
    else:
        raise MediaError(f"cannot use a {kind} as audio; pass a path, bytes, a numpy array with sampling_rate, "
                         "or an IPython Audio")
    if rate <= 0:
        raise MediaError(f"audio {what} has an invalid sampling rate {rate}")
    if samples.shape[0] == 0:
        raise MediaError(f"audio {what} has no samples")
    if samples.shape[0] / rate > MAX_AUDIO_SECONDS:
        raise MediaError(f"audio {what} lasts {samples.shape[0] / rate / 60:.0f} min; the limit is "
                         f"{MAX_AUDIO_SECONDS // 60} min: trim it first")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if not np.any(np.abs(mono) > 1e-6):
        raise MediaError(f"audio {what} is silent (every sample is zero): there is nothing to hear")
    return resample(mono, rate)
