"""Prompt rendering: the one place a prompt becomes the text the model reads.

Harvest training, evaluation, routing and task vectors all call ``render_prompt``, so an adapter is
trained and evaluated on exactly the same text (no train/eval skew): the tokenizer's chat template
with the user turn and the assistant turn opened, or, for a tokenizer without a template, the
prompt and a newline.
"""

from __future__ import annotations

from typing import Sequence


def uses_chat(tokenizer) -> bool:
    """Whether ``tokenizer`` has a chat template (then prompts are rendered through it)."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: str, chat: bool = True) -> str:
    """The generation prompt for ``prompt``: the chat template with the assistant turn opened (when
    ``chat`` and the tokenizer has one), else ``prompt + "\\n"``."""
    if chat and uses_chat(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + "\n"


def render_prompts(tokenizer, prompts: Sequence[str], chat: bool = True) -> list[str]:
    """``render_prompt`` for each prompt."""
    return [render_prompt(tokenizer, prompt, chat) for prompt in prompts]


def render_example(tokenizer, prompt: str, answer: str) -> str | None:
    """The whole chat-rendered exchange (user prompt, assistant answer), or None without a template."""
    if not uses_chat(tokenizer):
        return None
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": answer}], tokenize=False)
