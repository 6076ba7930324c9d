"""The conversation template of the reference implementation (``docs/algorithm.md`` section 2).

``BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:`` -- no trailing space: the response is appended directly
(``prompt + response + eos``).  Multi-turn input is a list ``[user, assistant, user, ..., user]``; each earlier
assistant turn is followed by the eos token and the next ``USER: ...`` turn.
"""
from __future__ import annotations

PROMPT_BEGIN = "BEGINNING OF CONVERSATION: "
PROMPT_USER = "USER: {input} "
PROMPT_ASSISTANT = "ASSISTANT:"  # no space at the end
PROMPT_INPUT = PROMPT_BEGIN + PROMPT_USER + PROMPT_ASSISTANT


def _turns(input) -> list[str]:  # noqa: A002
    """``input`` as the list of turns ``[user, assistant, ..., user]``, checked."""
    if isinstance(input, str):
        return [input]
    if not isinstance(input, (list, tuple)) or not all(isinstance(x, str) for x in input):
        raise TypeError(f"input must be a string or a list of strings, got {type(input).__name__}")
    if len(input) % 2 != 1:
        raise ValueError("a conversation must have an odd number of turns and end with the user's turn")
    return list(input)


def format_prompt(input: str | list[str], eos_token: str = "") -> str:  # noqa: A002 - the reference's name
    """Templated prompt for one user message, or for a conversation ``[user, assistant, ..., user]``."""
    turns = _turns(input)
    if len(turns) > 1 and not eos_token:
        raise ValueError("multi-turn prompts need the eos token that ends each assistant turn")
    buffer = [PROMPT_BEGIN]
    for i, line in enumerate(turns):
        if i % 2 == 0:
            buffer.extend((PROMPT_USER.format(input=line), PROMPT_ASSISTANT))
        else:
            buffer.extend((line, eos_token))
    return "".join(buffer)


CHAT_TEMPLATES = ("reference", "tokenizer")


def format_chat_prompt(input: str | list[str], tokenizer) -> str:  # noqa: A002 - the reference's name
    """Opt-in alternative to :func:`format_prompt` (``--chat_template tokenizer``): the prompt rendered by the
    tokenizer's own chat template (e.g. ChatML for SmolLM2-Instruct), with the generation prompt appended, so the
    response again follows directly and ends with the tokenizer's eos.  ``input`` as for :func:`format_prompt`."""
    turns = _turns(input)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat_template tokenizer: this tokenizer has no chat_template")
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
