"""What a chat request may change about how its messages become a prompt.

The chat template is the operator's: it decides the prompt's format, and a client-supplied Jinja
template is code the server renders. So a request may replace it (`chat_template`, or
`chat_template_kwargs.chat_template`, which transformers also honours) only when the operator set
`trust_request_chat_template` (vLLM's name). Other `chat_template_kwargs` are template variables; the
few names that would instead steer the rendering call itself (tokenize, return_dict, ...) are refused.
"""

from __future__ import annotations

from typing import Any

from cluster.errors import InvalidRequestError

# apply_chat_template's own parameters: passed as "kwargs" they would change the call, not the template.
RENDERING_PARAMETERS = frozenset({
    "conversation", "tokenize", "add_generation_prompt", "continue_final_message", "return_dict",
    "return_tensors", "return_assistant_tokens_mask", "padding", "truncation", "max_length", "tokenizer_kwargs",
})
TRUST_HINT = (
    "start the server with trust_request_chat_template: true (--trust-request-chat-template) to allow it"
)


def chat_template_overrides(
    chat_template: str | None, chat_template_kwargs: dict[str, Any] | None, trusted: bool
) -> dict[str, Any]:
    """The keyword arguments a request adds to `apply_chat_template`, or a 400 naming the field."""
    overrides = dict(chat_template_kwargs or {})
    steering = sorted(RENDERING_PARAMETERS & set(overrides))
    if steering:
        raise InvalidRequestError(
            f"chat_template_kwargs.{steering[0]} is not a template variable but a rendering option the server "
            "sets itself: remove it", param="chat_template_kwargs",
        )
    if "chat_template" in overrides and not trusted:
        raise InvalidRequestError(
            f"chat_template_kwargs.chat_template: replacing the chat template per request is disabled: {TRUST_HINT}",
            param="chat_template_kwargs",
        )
    if chat_template is not None:
        if not trusted:
            raise InvalidRequestError(
                f"chat_template: replacing the chat template per request is disabled: {TRUST_HINT}",
                param="chat_template",
            )
        overrides["chat_template"] = chat_template
    return overrides
