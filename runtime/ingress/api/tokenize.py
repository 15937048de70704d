"""POST /tokenize and /detokenize (also under /v1/), SGLang's and vLLM's tokenizer endpoints.

    /tokenize    {"prompt": "Hi" | ["Hi", "there"], "add_special_tokens": true}
              or {"messages": [...chat...], "add_generation_prompt": true, "tools": [...]}
              -> {"tokens": [...] | [[...], ...], "count": n | [n, ...], "max_model_len": context}
    /detokenize  {"tokens": [...] | [[...], ...], "skip_special_tokens": true} -> {"text": "..." | [...]}"""

from __future__ import annotations

from typing import Any

from msgspec import Struct

from httpd import HttpError, Request, Response, json_response
from runtime.ingress.api.protocol import ChatMessage, chat_message_dicts, decode_body
from runtime.ingress.errors import RequestError
from runtime.ingress.frontend import Frontend


class TokenizeBody(Struct):
    prompt: str | list[str] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool | None = None  # with messages; default: as a chat completion (true)
    continue_final_message: bool = False
    tools: list[Any] | None = None
    tool_choice: Any = None  # "none": the tools stay out of the prompt, as in a chat completion
    model: str | None = None


class DetokenizeBody(Struct):
    tokens: list[int | list[int]] | None = None
    skip_special_tokens: bool = True
    model: str | None = None


class TokenizeApi:
    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    def tokenize(self, request: Request) -> Response:
        body: TokenizeBody = decode_body(request.body, TokenizeBody)
        if (body.prompt is None) == (body.messages is None):
            raise HttpError(400, "give exactly one of prompt or messages", "prompt")
        try:
            if body.messages is not None:
                add_generation_prompt = (not body.continue_final_message if body.add_generation_prompt is None
                                         else body.add_generation_prompt)
                tools = None if body.tool_choice == "none" else body.tools
                tokens = self.frontend.apply_chat_template(chat_message_dicts(body.messages), tools,
                                                           add_generation_prompt, body.continue_final_message)
                return self._answer(tokens)
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            lists = [self.frontend.encode(p, add_special_tokens=body.add_special_tokens) for p in prompts]
        except RequestError as err:
            raise HttpError(err.status, err.message, "messages" if body.messages is not None else "prompt") from None
        return self._answer(lists[0]) if isinstance(body.prompt, str) else self._answer_many(lists)

    def _answer(self, tokens: list[int]) -> Response:
        return json_response({"tokens": tokens, "count": len(tokens),
                              "max_model_len": self.frontend.model_info.context_length})

    def _answer_many(self, lists: list[list[int]]) -> Response:
        return json_response({"tokens": lists, "count": [len(t) for t in lists],
                              "max_model_len": self.frontend.model_info.context_length})

    def detokenize(self, request: Request) -> Response:
        body: DetokenizeBody = decode_body(request.body, DetokenizeBody)
        tokens = body.tokens
        if tokens is None:
            raise HttpError(400, "tokens: required, a list of token ids or a list of such lists", "tokens")
        if all(isinstance(t, int) for t in tokens):
            return json_response({"text": self._decode(tokens, body.skip_special_tokens, "tokens")})
        if not all(isinstance(t, list) for t in tokens):
            raise HttpError(400, "tokens: expected a list of token ids or a list of token-id lists, not a mix",
                            "tokens")
        return json_response({"text": [self._decode(ids, body.skip_special_tokens, f"tokens[{i}]")
                                       for i, ids in enumerate(tokens)]})

    def _decode(self, ids: list[int], skip_special_tokens: bool, field: str) -> str:
        vocab = self.frontend.model_info.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise HttpError(400, f"{field}: {bad} is not a token id (vocabulary size {vocab})", field)
        try:
            return self.frontend.decode(ids, skip_special_tokens=skip_special_tokens)
        except RequestError as err:
            raise HttpError(err.status, err.message, field) from None
