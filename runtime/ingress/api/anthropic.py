"""The Anthropic Messages API: POST /v1/messages (streamed or not) and /v1/messages/count_tokens,
as Anthropic's SDK and tools built on it (Claude Code and the like, pointed at another base URL)
call them. Text content only: image and tool blocks, and `tools`, are refused with a 400.

Mapping: `system` becomes a system message before `messages`; a last assistant message is
continued (prefill), as Anthropic does; the chat template renders the conversation. `max_tokens`
is required, as in Anthropic's API. Finishes: length -> "max_tokens", a stop sequence ->
"stop_sequence" (with `stop_sequence` set), EOS or a stop token -> "end_turn"."""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
from msgspec import Struct

from httpd import HttpError, Request, Response, StreamingResponse, json_response
from runtime.ingress.api.generation import Generation, abort_error, start_sse
from runtime.ingress.api.metrics import Metrics
from runtime.ingress.api.protocol import (
    FieldNames,
    NativeSamplingParams,
    check_prompt,
    check_sampling,
    decode_body,
    to_sampling_params,
)
from runtime.ingress.api.sequence import Job, Sequence
from runtime.ingress.errors import RequestError
from runtime.ingress.frontend import Frontend
from runtime.messages import LogprobOptions

_encode = msgspec.json.Encoder().encode
ANTHROPIC_FIELDS = FieldNames("", {"max_new_tokens": "max_tokens", "stop": "stop_sequences"})


class TextBlock(Struct):
    type: str
    text: str | None = None


class AnthropicMessage(Struct):
    role: str
    content: str | list[TextBlock]


class MessagesBody(Struct):
    model: str | None = None
    messages: list[AnthropicMessage] | None = None
    max_tokens: int | None = None
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[Any] | None = None
    metadata: Any = None


def anthropic_event(name: str, payload: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode(payload) + b"\n\n"


def _text(content: str | list[TextBlock], field: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        if block.type != "text" or block.text is None:
            raise HttpError(400, f"{field}[{j}]: only text blocks are supported, got type {block.type!r}",
                            f"{field}[{j}]")
        texts.append(block.text)
    return "".join(texts)


class AnthropicApi:
    def __init__(self, frontend: Frontend, metrics: Metrics | None):
        self.frontend = frontend
        self.metrics = metrics

    def _prompt(self, body: MessagesBody) -> list[int]:
        if body.tools:
            raise HttpError(400, "tools: tool use is not supported on /v1/messages yet", "tools")
        if not body.messages:
            raise HttpError(400, "messages: required, a non-empty list", "messages")
        conversation = []
        if body.system is not None:
            conversation.append({"role": "system", "content": _text(body.system, "system")})
        for i, message in enumerate(body.messages):
            if message.role not in ("user", "assistant"):
                raise HttpError(400, f"messages[{i}].role: must be user or assistant, got {message.role!r}",
                                f"messages[{i}].role")
            conversation.append({"role": message.role, "content": _text(message.content, f"messages[{i}].content")})
        prefill = conversation[-1]["role"] == "assistant"
        try:
            input_ids = self.frontend.apply_chat_template(conversation, None, not prefill, prefill)
        except RequestError as err:
            raise HttpError(err.status, err.message, "messages") from None
        info = self.frontend.model_info
        check_prompt(input_ids, info.vocab_size, info.context_length, "messages")
        return input_ids

    async def messages(self, request: Request) -> Response | StreamingResponse:
        arrival = time.perf_counter()
        body: MessagesBody = decode_body(request.body, MessagesBody)
        if body.max_tokens is None:
            raise HttpError(400, "max_tokens: required", "max_tokens")
        input_ids = self._prompt(body)
        params = NativeSamplingParams(max_new_tokens=body.max_tokens, temperature=body.temperature,
                                      top_p=body.top_p, top_k=body.top_k, stop=body.stop_sequences)
        info = self.frontend.model_info
        check_sampling(params, info.vocab_size, ANTHROPIC_FIELDS)
        sampling = to_sampling_params(params, len(input_ids), info.context_length, ANTHROPIC_FIELDS, None)
        message_id = f"msg_{uuid.uuid4().hex}"
        sequence = Sequence(Job(message_id, input_ids, sampling, LogprobOptions()), arrival)
        generation = Generation(self.frontend, [sequence], self.metrics)
        view = _MessageView(self.frontend.served_model_name, message_id, sequence)
        if body.stream:
            return await start_sse(generation, view.chunks, view.epilogue, done=b"", error_event=_error_event)
        try:
            await generation.run_to_end()
        except RequestError as err:
            raise HttpError(err.status, err.message) from None
        error = abort_error(sequence)
        if error is not None:
            raise error
        return json_response(view.message(complete=True))

    def count_tokens(self, request: Request) -> Response:
        body: MessagesBody = decode_body(request.body, MessagesBody)
        return json_response({"input_tokens": len(self._prompt(body))})


def _error_event(status: int, message: str) -> bytes:
    kind = "invalid_request_error" if status < 500 else "overloaded_error" if status == 503 else "api_error"
    return anthropic_event("error", {"type": "error", "error": {"type": kind, "message": message}})


class _MessageView:
    def __init__(self, model: str, message_id: str, sequence: Sequence):
        self.model = model
        self.id = message_id
        self.sequence = sequence
        self.started = False

    def _stop(self) -> tuple[str | None, str | None]:
        finish = self.sequence.finish
        if finish is None:
            return None, None
        if finish.type == "length":
            return "max_tokens", None
        if isinstance(finish.matched, str):
            return "stop_sequence", finish.matched
        return "end_turn", None

    def _usage(self, output_tokens: int) -> dict:
        return {"input_tokens": self.sequence.prompt_tokens, "output_tokens": output_tokens,
                "cache_read_input_tokens": self.sequence.cached_tokens, "cache_creation_input_tokens": 0}

    def message(self, complete: bool) -> dict:
        stop_reason, stop_sequence = self._stop() if complete else (None, None)
        content = [{"type": "text", "text": self.sequence.text}] if complete else []
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": self._usage(self.sequence.completion_tokens if complete else 0)}

    def chunks(self, index: int, update) -> bytes:
        error = abort_error(self.sequence)
        if error is not None:
            raise error
        out = b""
        if not self.started:
            self.started = True
            out += anthropic_event("message_start", {"type": "message_start", "message": self.message(False)})
            out += anthropic_event("content_block_start", {"type": "content_block_start", "index": 0,
                                                           "content_block": {"type": "text", "text": ""}})
        if update.text_delta:
            out += anthropic_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                           "delta": {"type": "text_delta", "text": update.text_delta}})
        return out

    def epilogue(self) -> bytes:
        stop_reason, stop_sequence = self._stop()
        return (anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0})
                + anthropic_event("message_delta", {"type": "message_delta",
                                                    "delta": {"stop_reason": stop_reason,
                                                              "stop_sequence": stop_sequence},
                                                    "usage": {"output_tokens": self.sequence.completion_tokens}})
                + anthropic_event("message_stop", {"type": "message_stop"}))
