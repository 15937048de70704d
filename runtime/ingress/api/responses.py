"""The OpenAI Responses API: POST /v1/responses (streamed or not), GET and DELETE
/v1/responses/{response_id}. Responses are kept in the durable store (runtime/ingress/store/
responses.py) unless `store` is false, so `previous_response_id` continues a conversation across
requests and server restarts.

A request's conversation is the previous response's (when chained), its output as an assistant
message, then `input` (a string: one user message; or a list of message items with text content).
`instructions` go first as a system message and, as in OpenAI's API, are not carried to the next
turn. `text.format` json_object / json_schema constrain the output with the grammar backend, as chat's
response_format does. Tools and `background` are refused."""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
from msgspec import Struct

from httpd import HttpError, Request, Response, StreamingResponse, json_response
from httpd.router import path_segment
from runtime.ingress.api.generation import Generation, abort_error, start_sse
from runtime.ingress.api.metrics import Metrics
from runtime.ingress.api.protocol import (
    CHAT_ROLES,
    FieldNames,
    NativeSamplingParams,
    check_prompt,
    check_sampling,
    decode_body,
    to_sampling_params,
)
from runtime.ingress.api.sequence import Job, Sequence
from runtime.ingress.api.structured import text_format_grammar
from runtime.ingress.errors import RequestError
from runtime.ingress.frontend import Frontend
from runtime.ingress.store.responses import ResponseStore, StoredResponse
from runtime.messages import LogprobOptions

_encode = msgspec.json.Encoder().encode
RESPONSES_FIELDS = FieldNames("", {"max_new_tokens": "max_output_tokens"})
TEXT_PART_TYPES = ("input_text", "output_text", "text")


class InputPart(Struct):
    type: str
    text: str | None = None


class InputItem(Struct):
    role: str | None = None
    content: str | list[InputPart] | None = None
    type: str = "message"


class TextFormat(Struct):
    type: str = "text"
    name: str | None = None
    schema: Any = None
    strict: bool | None = None
    description: str | None = None


class TextOptions(Struct):
    format: TextFormat | None = None


class ResponsesBody(Struct):
    input: str | list[InputItem] | None = None
    model: str | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool = True
    metadata: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    text: TextOptions | None = None
    background: bool = False
    user: str | None = None


class ResponsesApi:
    def __init__(self, frontend: Frontend, store: ResponseStore, metrics: Metrics | None):
        self.frontend = frontend
        self.store = store
        self.metrics = metrics

    async def create(self, request: Request) -> Response | StreamingResponse:
        arrival = time.perf_counter()
        body: ResponsesBody = decode_body(request.body, ResponsesBody)
        _refuse_unsupported(body)
        conversation = self._conversation(body)
        rendered = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + conversation
        try:
            input_ids = self.frontend.apply_chat_template(rendered, None, True, False)
        except RequestError as err:
            raise HttpError(err.status, err.message, "input") from None
        info = self.frontend.model_info
        check_prompt(input_ids, info.vocab_size, info.context_length, "input")
        params = NativeSamplingParams(max_new_tokens=body.max_output_tokens, temperature=body.temperature,
                                      top_p=body.top_p)
        check_sampling(params, info.vocab_size, RESPONSES_FIELDS)
        text_format = body.text.format if body.text is not None and body.text.format is not None else TextFormat()
        grammar = text_format_grammar(self.frontend, text_format.type, text_format.schema)
        sampling = to_sampling_params(params, len(input_ids), info.context_length, RESPONSES_FIELDS, None,
                                      grammar=grammar)
        view = _ResponseView(self.frontend.served_model_name, body)
        sequence = Sequence(Job(view.id, input_ids, sampling, LogprobOptions()), arrival)
        view.sequence = sequence
        generation = Generation(self.frontend, [sequence], self.metrics)

        def finish() -> dict:
            response = view.response()
            if body.store:
                self.store.put(StoredResponse(view.id, view.created_at, response, conversation))
            return response

        if body.stream:
            return await start_sse(generation, view.events, lambda: view.closing_events(finish()), done=b"",
                                   error_event=view.error_event)
        try:
            await generation.run_to_end()
        except RequestError as err:
            raise HttpError(err.status, err.message) from None
        error = abort_error(sequence)
        if error is not None:
            raise error
        return json_response(finish())

    def _conversation(self, body: ResponsesBody) -> list[dict]:
        history: list[dict] = []
        if body.previous_response_id is not None:
            previous = self.store.get(body.previous_response_id)
            if previous is None:
                raise HttpError(404, f"previous_response_id: no stored response {body.previous_response_id!r} "
                                     "(responses created with store: false are not kept)", "previous_response_id")
            history = previous.conversation + [{"role": "assistant", "content": _output_text(previous.body)}]
        if body.input is None:
            raise HttpError(400, "input: required", "input")
        if isinstance(body.input, str):
            return history + [{"role": "user", "content": body.input}]
        if not body.input:
            raise HttpError(400, "input: the list is empty", "input")
        messages = []
        for i, item in enumerate(body.input):
            field = f"input[{i}]"
            if item.type != "message" or item.role is None:
                raise HttpError(400, f"{field}: only message items (role and text content) are supported, got type "
                                     f"{item.type!r}", field)
            if item.role not in CHAT_ROLES:
                raise HttpError(400, f"{field}.role: must be one of {', '.join(CHAT_ROLES)}", f"{field}.role")
            messages.append({"role": item.role, "content": _item_text(item, field)})
        return history + messages

    def retrieve(self, request: Request) -> Response:
        return json_response(self._stored(path_segment(request, 3)).body)

    def delete(self, request: Request) -> Response:
        response_id = path_segment(request, 3)
        if not self.store.delete(response_id):
            raise HttpError(404, f"no stored response {response_id!r}", "response_id")
        return json_response({"id": response_id, "object": "response.deleted", "deleted": True})

    def _stored(self, response_id: str) -> StoredResponse:
        record = self.store.get(response_id)
        if record is None:
            raise HttpError(404, f"no stored response {response_id!r}", "response_id")
        return record


def _refuse_unsupported(body: ResponsesBody) -> None:
    if body.tools:
        raise HttpError(400, "tools: tool use is not supported on /v1/responses yet", "tools")
    if body.background:
        raise HttpError(400, "background: background responses are not supported", "background")


def _item_text(item: InputItem, field: str) -> str:
    if item.content is None:
        return ""
    if isinstance(item.content, str):
        return item.content
    texts = []
    for j, part in enumerate(item.content):
        if part.type not in TEXT_PART_TYPES or part.text is None:
            raise HttpError(400, f"{field}.content[{j}]: only text parts are supported, got type {part.type!r}",
                            f"{field}.content[{j}]")
        texts.append(part.text)
    return "".join(texts)


def _output_text(response: dict) -> str:
    return "".join(part.get("text", "") for item in response.get("output", []) if item.get("type") == "message"
                   for part in item.get("content", []) if part.get("type") == "output_text")


class _ResponseView:
    """The response object and its stream events for one request."""

    def __init__(self, model: str, body: ResponsesBody):
        self.model = model
        self.body = body
        self.id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.sequence: Sequence | None = None
        self.sequence_number = 0
        self.started = False

    def _status(self) -> str:
        finish = self.sequence.finish
        if finish is None:
            return "in_progress"
        return "incomplete" if finish.type == "length" else "completed"

    def _message(self, status: str) -> dict:
        content = [] if status == "in_progress" else [self._part()]
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def _part(self, text: str | None = None) -> dict:
        return {"type": "output_text", "text": self.sequence.text if text is None else text, "annotations": [],
                "logprobs": []}

    def response(self) -> dict:
        status = self._status()
        sequence, body = self.sequence, self.body
        usage = None
        if status != "in_progress":
            usage = {"input_tokens": sequence.prompt_tokens,
                     "input_tokens_details": {"cached_tokens": sequence.cached_tokens},
                     "output_tokens": sequence.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": sequence.prompt_tokens + sequence.completion_tokens}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": [] if status == "in_progress" else [self._message("completed")],
            "instructions": body.instructions, "previous_response_id": body.previous_response_id,
            "max_output_tokens": body.max_output_tokens, "temperature": sequence.job.sampling.temperature,
            "top_p": sequence.job.sampling.top_p, "incomplete_details":
                {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "error": None, "metadata": body.metadata or {}, "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": [], "text": {"format": self._format()}, "truncation": "disabled", "store": body.store,
            "usage": usage, "user": body.user,
        }

    def _format(self) -> dict:
        text = self.body.text
        given = text.format if text is not None and text.format is not None else TextFormat()
        return {k: v for k, v in msgspec.structs.asdict(given).items() if v is not None}

    def _event(self, kind: str, **fields) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return b"event: " + kind.encode() + b"\ndata: " + _encode(payload) + b"\n\n"

    def _where(self) -> dict:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def events(self, index: int, update) -> bytes:
        error = abort_error(self.sequence)
        if error is not None:
            raise error
        out = b""
        if not self.started:
            self.started = True
            opening = {**self.response(), "status": "in_progress", "output": [], "usage": None}
            out += self._event("response.created", response=opening)
            out += self._event("response.in_progress", response=opening)
            out += self._event("response.output_item.added", output_index=0, item=self._message("in_progress"))
            out += self._event("response.content_part.added", **self._where(), part=self._part(""))
        if update.text_delta:
            out += self._event("response.output_text.delta", **self._where(), delta=update.text_delta, logprobs=[])
        return out

    def closing_events(self, response: dict) -> bytes:
        text = self.sequence.text
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return (self._event("response.output_text.done", **self._where(), text=text, logprobs=[])
                + self._event("response.content_part.done", **self._where(), part=self._part())
                + self._event("response.output_item.done", output_index=0, item=self._message("completed"))
                + self._event(kind, response=response))

    def error_event(self, status: int, message: str) -> bytes:
        return self._event("error", code=str(status), message=message, param=None)
