"""Refuse a prompt or `max_tokens` that cannot fit, before it costs a queue slot.

Characters are always checked. Tokens are checked with the model's own
`tokenizer.json` (shared/tokenizing.py, no MLX) when it is on this machine,
and only when the text is long enough to possibly not fit: a token covers at
least one UTF-8 byte, so a prompt of fewer bytes than the budget never needs
tokenizing. Counts leave out the chat template's few tokens, so nothing
that fits is refused.
"""

from __future__ import annotations

import logging

from shared.errors import InvalidRequest, ModelFilesMissing
from shared.models import ModelRegistry
from shared.schemas import GenerateRequest
from shared.settings import Settings
from shared.tokenizing import ModelTexts

logger = logging.getLogger(__name__)


class PromptLimits:
    def __init__(self, models: ModelRegistry, settings: Settings) -> None:
        self._models = models
        self._settings = settings
        self._texts = ModelTexts()

    def check(self, request: GenerateRequest) -> GenerateRequest:
        """The request with its `max_tokens` resolved (the one place it gets its default), if it
        fits; raises `ModelNotFound`, `ModelFilesMissing` or `InvalidRequest`."""
        spec = self._models.get(request.model)
        problem = spec.problem()
        if problem is not None:
            # It would only be queued to fail: say so now, for good (a retry cannot help).
            raise ModelFilesMissing(f"Model '{spec.name}' cannot be loaded: {problem}", param="model")
        settings = self._settings
        field = "prompt" if request.prompt is not None else "messages"
        if request.max_tokens is not None and request.max_tokens > settings.max_tokens_cap:
            raise InvalidRequest(
                f"max_tokens is {request.max_tokens}; the limit here is {settings.max_tokens_cap}",
                param="max_tokens",
            )
        char_limit = spec.max_prompt_chars or settings.max_prompt_chars
        chars = request.prompt_chars()
        if chars > char_limit:
            raise InvalidRequest(f"The prompt has {chars} characters; the limit is {char_limit}", param=field)

        budget = request.max_tokens or settings.default_max_tokens
        resolved = request.model_copy(update={"max_tokens": budget})
        model_text = self._texts.get(spec)
        tokenizer, context = model_text.tokenizer, model_text.context
        if context is None:
            return resolved
        text = request.prompt if request.prompt is not None else "\n".join(m.text() for m in request.messages or [])
        if tokenizer is None or len(text.encode()) + budget <= context:
            return resolved
        prompt_tokens = model_text.count(text)
        if prompt_tokens >= context:
            raise InvalidRequest(
                f"The prompt has at least {prompt_tokens} tokens; model '{spec.name}' takes {context} in all",
                param=field,
            )
        if prompt_tokens + budget > context:
            raise InvalidRequest(
                f"Model '{spec.name}' has a context of {context} tokens; the prompt takes at least "
                f"{prompt_tokens}, so max_tokens can be at most {context - prompt_tokens}, not {budget}",
                param="max_tokens",
            )
        return resolved
