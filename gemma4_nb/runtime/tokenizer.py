"""Tokenizer (``tokenizer.json`` through the ``tokenizers`` library) and streaming detokenization."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from ..errors import PromptError, TokenizerError
from .chat_template import render_chat


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialized as a dict
        return value.get("content")
    return value


class Tokenizer:
    """Encodes, decodes and renders chat prompts for one checkpoint."""

    def __init__(self, model_dir: Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{model_dir}: no tokenizer.json; the checkpoint's tokenizer files are missing")
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises a plain Exception
            raise TokenizerError(f"{path}: cannot be loaded ({exc}); download it again") from None
        config = {}
        config_path = model_dir / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise TokenizerError(f"{config_path}: not valid JSON ({exc})") from None
        self.special_tokens = {
            key: text
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
            if (text := _token_text(config.get(key))) is not None
        }
        self.chat_template = self._find_template(model_dir, config)
        self.base_model = bool(config.get("gemma4_nb_base_model", False))  # not instruction-tuned
        self.all_special_ids = {
            tid for tid, tok in self.hf.get_added_tokens_decoder().items() if tok.special
        }

    @staticmethod
    def _find_template(model_dir: Path, config: dict) -> str | None:
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None and (model_dir / "chat_template.json").is_file():
            template = json.loads((model_dir / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        return template

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self.hf.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise PromptError(f"the text to encode must be a string, got {type(text).__name__}")
        try:
            return self.hf.encode(text, add_special_tokens=add_special_tokens).ids
        except (TypeError, UnicodeEncodeError):
            where = next((i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF), None)
            if where is None:
                raise
            raise PromptError(
                f"the text holds a lone surrogate (U+{ord(text[where]):04X}) at character {where}, which is not valid "
                "Unicode (it comes from bytes decoded with errors='surrogateescape', or a JSON \\ud8xx escape); decode "
                "the bytes with the right encoding, or replace it: text.encode('utf-8', 'replace').decode()"
            ) from None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], **kwargs) -> str:
        if not self.chat_template:
            raise TokenizerError(
                "this checkpoint ships no chat template (tokenizer_config.json or chat_template.jinja); "
                "use generate() with a plain prompt instead of chat()"
            )
        return render_chat(self.chat_template, messages, special_tokens=self.special_tokens, **kwargs)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Byte-fallback tokens decode to U+FFFD until the character is complete, so text ending in
    U+FFFD is held back. Only a short window of recent tokens is re-decoded each step.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens up to here are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self._prefix : self._read], self.skip)
        full_text = self.tok.decode(self.ids[self._prefix :], self.skip)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self.tok.decode(self.ids[self._prefix : self._read], self.skip)
        full_text = self.tok.decode(self.ids[self._prefix :], self.skip)
        self._prefix = self._read = len(self.ids)
        return full_text[len(prefix_text) :]
