"""A tiny random checkpoint that generates nothing a reader sees: every token it generates is a
thought-channel marker (hidden from the stream), and it has no stop token, so it generates until
``max_new_tokens`` -- the case where a Stop checked only when visible text grows never fires."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from gemma4_nb.devtools.tiny import write_tiny_checkpoint

HIDDEN = "<|channel>"


def write_hidden_token_checkpoint(out_dir: Path, token: str = HIDDEN) -> Path:
    """Weights built so the head always prefers ``token``: every token's embedding has the same
    positive first component, no layer writes to that component of the residual stream (row 0
    of each output and down projection is zero), and ``token``'s embedding is that component
    alone, ten times larger. Its logit then leads by several units whatever the input."""
    path = write_tiny_checkpoint(out_dir)  # a 4,096-token context
    tok = json.loads((path / "tokenizer.json").read_text())
    target = next(t["id"] for t in tok["added_tokens"] if t["content"] == token)
    prefix = "model.language_model."
    weights = load_file(str(path / "model.safetensors"))
    embed = weights[prefix + "embed_tokens.weight"]
    embed[:, 0] = 1.0
    embed[target] = 0.0
    embed[target, 0] = 10.0
    for name, t in weights.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            t[0] = 0.0
    weights[prefix + "norm.weight"][0] = 1.0
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    for name, key in (("config.json", None), ("generation_config.json", "eos_token_id")):
        data = json.loads((path / name).read_text())  # no stop token: it would run to max_new_tokens
        if key:
            data[key] = [99999]
        else:
            data["text_config"]["eos_token_id"] = 99999
        (path / name).write_text(json.dumps(data))
    return path
