"""Chat prompts rendered by the runtime equal transformers' apply_chat_template."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

import gemma4_nb
from gemma4_nb.errors import PromptError
from gemma4_nb.runtime.chat_template import render_chat
from gemma4_nb.runtime.tokenizer import Tokenizer

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Explain GQA in two lines"}],
    "system": [
        {"role": "system", "content": "You are a concise data-science assistant."},
        {"role": "user", "content": "  What does df.describe() show?  "},
    ],
    "multi_turn": [
        {"role": "system", "content": "Answer in Markdown."},
        {"role": "user", "content": "Load sales.csv"},
        {"role": "assistant", "content": "```python\ndf = pd.read_csv('sales.csv')\n```"},
        {"role": "user", "content": "Now plot revenue by región 🙂"},
    ],
    "parts": [
        {"role": "user", "content": [{"type": "text", "text": "What is in this plot?"}, {"type": "image"}]},
    ],
}


@pytest.fixture(scope="module")
def both(tokenizer_dir):
    return Tokenizer(tokenizer_dir), AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [False, True])
def test_rendering_matches_transformers(name, thinking, both):
    ours, ref = both
    messages = CONVERSATIONS[name]
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    got = ours.render_chat(messages, add_generation_prompt=True, enable_thinking=thinking)
    assert got == expected
    assert ours.encode(got) == ref.encode(expected, add_special_tokens=False)


def test_thinking_is_off_by_default(both):
    ours, _ = both
    prompt = ours.render_chat(CONVERSATIONS["system"])
    assert "<|think|>" not in prompt
    assert prompt.startswith("<bos><|turn>system\n")
    assert prompt.endswith("<|turn>model\n")


def test_template_with_tools_matches_transformers(both):
    ours, ref = both
    tools = [{"type": "function", "function": {"name": "run_code", "description": "Run Python",
                                                "parameters": {"type": "object", "properties": {"code": {"type": "string"}}}}}]
    messages = CONVERSATIONS["single"]
    expected = ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(messages, tools=tools) == expected


def test_jinja_features_used_by_hub_templates():
    source = (
        "{% for m in messages %}{% if loop.index0 > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}"
        "{% if not messages %}{{ raise_exception('no messages') }}{% endif %}"
    )
    out = render_chat(source, [{"role": "user", "content": "<é>"}, {"role": "user", "content": "b"},
                               {"role": "user", "content": "c"}])
    assert out == '"<é>""b"'


def test_bad_messages_are_clear(tiny_dir):
    model = gemma4_nb.load(tiny_dir, progress=False)
    with pytest.raises(PromptError, match="non-empty list"):
        model.chat([])
    with pytest.raises(PromptError, match="unknown role"):
        model.chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(PromptError, match="empty"):
        model.chat([{"role": "user", "content": "   "}])
