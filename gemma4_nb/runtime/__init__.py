"""The runtime: Gemma checkpoints in, text out, inside one Python process.

Configuration and checkpoints, the decoder and its KV cache, quantized weights, tokenizer and chat
template, images and audio, generation and speculative decoding. It imports the kernels below it
and never the notebook layer, IPython or ipywidgets.
"""

from .model import Model, load

__all__ = ["Model", "load"]
