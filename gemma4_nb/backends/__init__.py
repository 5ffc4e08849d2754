"""Backends: how the notebook features reach a model.

:mod:`.base` is the interface (a conversation in, a :class:`~.base.Reply` out), :mod:`.local` the
in-kernel runtime, :mod:`.openai_compat` an OpenAI-compatible server (vLLM, llama.cpp's server,
Ollama), :mod:`.toolcalls` Gemma 4's tool-call syntax. Imports the runtime, never the notebook layer.
"""
