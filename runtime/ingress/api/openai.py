"""The OpenAI-compatible API: GET /v1/models, POST /v1/completions, POST /v1/chat/completions."""

from __future__ import annotations

import time
import uuid

from httpd import HttpError, Request, Response, StreamingResponse, json_response
from httpd.sse import sse_event
from runtime.constrained.chat_output import ChatOutputParser, ChatOutputStream
from runtime.constrained.reasoning import ReasoningParser
from runtime.ingress.api.generation import Generation, abort_error, http_error, start_sse
from runtime.ingress.api.metrics import Metrics
from runtime.ingress.api.protocol import (
    CHAT_FIELDS_MAX_COMPLETION,
    MAX_N,
    MAX_OPENAI_TOP_LOGPROBS,
    OPENAI_FIELDS,
    ChatBody,
    CompletionBody,
    chat_message_dicts,
    check_custom_logit_processor,
    check_prompt,
    check_sampling,
    check_sequence_count,
    decode_body,
    openai_sampling,
    request_deadline,
    to_sampling_params,
)
from runtime.ingress.api.sequence import Job, Sequence
from runtime.ingress.api.structured import reasoning_grammar, request_grammar
from runtime.ingress.api.tools import chat_tools, template_tool_calls
from runtime.ingress.errors import RequestError
from runtime.ingress.frontend import Frontend, checked_template_kwargs
from runtime.messages import GrammarSpec, LogprobOptions, TokenLogprobs
from runtime.multimodal.inputs import ProcessedPrompt
from runtime.multimodal.media import MediaError

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's and SGLang's


class OpenAIApi:
    def __init__(self, frontend: Frontend, metrics: Metrics | None):
        self.frontend = frontend
        self.metrics = metrics
        self.model_info = frontend.model_info

    def models(self, request: Request) -> Response:
        return json_response({"object": "list", "data": [self._model_card()]})

    def model(self, request: Request) -> Response:
        """GET /v1/models/{served model name} (other names: no route, 404)."""
        return json_response(self._model_card())

    def _model_card(self) -> dict:
        return {
            "id": self.frontend.served_model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "runtime",
            "root": self.frontend.served_model_name,
            "max_model_len": self.model_info.context_length,
        }

    # ------------------------------------------------------------------ /v1/completions

    async def completions(self, request: Request) -> Response | StreamingResponse:
        arrival = time.perf_counter()
        body: CompletionBody = decode_body(request.body, CompletionBody)
        deadline = request_deadline(body.timeout, self.frontend.args.request_timeout, time.monotonic())
        processor = check_custom_logit_processor(body.custom_logit_processor,
                                                 self.frontend.args.enable_custom_logit_processor)
        if body.suffix:
            raise HttpError(400, "suffix: inserting text (suffix) is not supported", "suffix")
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise HttpError(400, "best_of: only best_of == n is supported", "best_of")
        prompts, prompt_texts = await self._completion_prompts(body)
        top = body.logprobs
        if top is not None and not 0 <= top <= MAX_OPENAI_TOP_LOGPROBS:
            raise HttpError(400, f"logprobs: must be in [0, {MAX_OPENAI_TOP_LOGPROBS}], got {top}", "logprobs")
        echo = bool(body.echo)
        if self.frontend.tokenizer is None and (echo or top is not None):
            raise HttpError(400, f"{'echo' if echo else 'logprobs'}: needs the tokenizer to turn tokens into text; "
                                 "the server runs with --skip-tokenizer-init", "echo" if echo else "logprobs")
        options = LogprobOptions(True, 0 if echo else -1, top) if top is not None else LogprobOptions()
        params = openai_sampling(body, body.max_tokens, 1.0)
        check_sampling(params, self.model_info.vocab_size, OPENAI_FIELDS)
        grammar = request_grammar(self.frontend, params, body.response_format, OPENAI_FIELDS)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        sequences = self._sequences(request_id, body.rid, prompts, params, options, COMPLETIONS_DEFAULT_MAX_TOKENS,
                                    arrival, deadline=deadline, grammar=grammar, processor=processor)
        view = _CompletionView(self, request_id, params.n, prompt_texts if echo else None, top)
        if body.stream:
            return await self._stream(sequences, view, _include_usage(body))
        await self._run(sequences)
        return json_response(view.response(sequences))

    async def _completion_prompts(self, body: CompletionBody) -> tuple[list[list[int]], list[str | None]]:
        prompt = body.prompt
        if prompt is None:
            raise HttpError(400, "prompt: required", "prompt")
        if isinstance(prompt, str):
            items = [prompt]
        elif not prompt:
            raise HttpError(400, "prompt: the prompt is empty", "prompt")
        elif all(isinstance(x, int) for x in prompt):
            items = [prompt]
        elif all(isinstance(x, str) for x in prompt) or all(isinstance(x, list) for x in prompt):
            items = prompt
        else:
            raise HttpError(400, "prompt: expected a string, a list of strings, a list of token ids or a list of "
                                 "token-id lists", "prompt")
        _check_n(body.n)
        check_sequence_count(len(items) * (body.n or 1), self.frontend.args.max_seqs_per_request,
                             "prompt (prompts x n)")
        ids, texts = [], []
        for i, item in enumerate(items):
            field = "prompt" if len(items) == 1 else f"prompt[{i}]"
            if isinstance(item, str):
                if not item:
                    raise HttpError(400, f"{field}: the prompt is empty", field)
                ids.append(await self._encode(item, field))
                texts.append(item)
            else:
                check_prompt(item, self.model_info.vocab_size, self.model_info.context_length, field)
                ids.append(item)
                texts.append(None)  # decoded only if echo needs it
        return ids, texts

    # ------------------------------------------------------------------ /v1/chat/completions

    async def chat_completions(self, request: Request) -> Response | StreamingResponse:
        arrival = time.perf_counter()
        body: ChatBody = decode_body(request.body, ChatBody)
        deadline = request_deadline(body.timeout, self.frontend.args.request_timeout, time.monotonic())
        _check_n(body.n)
        processor = check_custom_logit_processor(body.custom_logit_processor,
                                                 self.frontend.args.enable_custom_logit_processor)
        tools = chat_tools(self.frontend, body.tools, body.tool_choice, body.parallel_tool_calls)
        vision = self.frontend.vision
        image_refs: list | None = [] if vision is not None else None
        messages = chat_message_dicts(body.messages, image_refs)
        for i, message in enumerate(messages):
            if "tool_calls" in message:
                message["tool_calls"] = template_tool_calls(message["tool_calls"], f"messages[{i}].tool_calls")
        continue_final = body.continue_final_message
        if continue_final is None:
            continue_final = messages[-1]["role"] == "assistant"  # assistant prefill: continue it
        add_generation_prompt = body.add_generation_prompt
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final
        if continue_final and add_generation_prompt:
            raise HttpError(400, "continue_final_message and add_generation_prompt cannot both be true",
                            "add_generation_prompt")
        if continue_final and messages[-1]["role"] != "assistant":
            raise HttpError(400, "continue_final_message: the last message must be the assistant's",
                            "continue_final_message")
        images = None
        try:
            if vision is not None:  # a vision language model: its processor renders and tokenizes
                images = await vision.chat(messages, image_refs, tools.template_tools, add_generation_prompt,
                                           continue_final, checked_template_kwargs(body.chat_template_kwargs))
                input_ids = images.input_ids
            else:
                input_ids = await self.frontend.apply_chat_template_async(messages, tools.template_tools,
                                                                          add_generation_prompt, continue_final,
                                                                          body.chat_template_kwargs)
        except RequestError as err:
            raise HttpError(err.status, err.message, err.param or "messages") from None
        except MediaError as err:
            raise HttpError(err.status, str(err), err.field) from None
        check_prompt(input_ids, self.model_info.vocab_size, self.model_info.context_length, "messages")

        top = body.top_logprobs
        if top is not None and not body.logprobs:
            raise HttpError(400, "top_logprobs: requires logprobs to be true", "top_logprobs")
        if top is not None and not 0 <= top <= MAX_OPENAI_TOP_LOGPROBS:
            raise HttpError(400, f"top_logprobs: must be in [0, {MAX_OPENAI_TOP_LOGPROBS}], got {top}", "top_logprobs")
        options = LogprobOptions(True, -1, top or 0) if body.logprobs else LogprobOptions()
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = openai_sampling(body, max_tokens, 1.0)
        names = OPENAI_FIELDS if body.max_completion_tokens is None else CHAT_FIELDS_MAX_COMPLETION
        check_sampling(params, self.model_info.vocab_size, names)
        if tools.keeps_special_tokens and body.skip_special_tokens is None:
            params.skip_special_tokens = False  # the family's call markers are special tokens
        reasoning = None
        if self.frontend.args.reasoning_parser and body.separate_reasoning is not False:
            reasoning = ReasoningParser(self.frontend.args.reasoning_parser)
        grammar = request_grammar(self.frontend, params, body.response_format, names)
        if grammar is not None and tools.grammar is not None:
            raise HttpError(400, "tool_choice: a forced tool call cannot be combined with response_format or another "
                                 "grammar", "tool_choice")
        grammar = reasoning_grammar(grammar or tools.grammar, reasoning)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        sequences = self._sequences(request_id, body.rid, [input_ids], params, options, None, arrival, names, deadline,
                                    grammar, images, processor)
        output = None
        if reasoning is not None or tools.parser is not None:
            output = ChatOutputParser(reasoning, tools.parser, max_calls=None if tools.parallel else 1)
        view = _ChatView(self, request_id, bool(body.logprobs), output)
        if body.stream:
            return await self._stream(sequences, view, _include_usage(body))
        await self._run(sequences)
        return json_response(view.response(sequences))

    # ------------------------------------------------------------------ shared

    def _sequences(self, request_id: str, rid: str | None, prompts: list[list[int]], params, options, default_max,
                   arrival: float, names=OPENAI_FIELDS, deadline: float | None = None,
                   grammar: GrammarSpec | None = None, images: ProcessedPrompt | None = None,
                   processor: str | None = None) -> list[Sequence]:
        base = rid or request_id
        sequences = []
        for i, input_ids in enumerate(prompts):
            for j in range(params.n):
                sampling = to_sampling_params(params, len(input_ids), self.model_info.context_length, names,
                                              default_max, seed_offset=j, grammar=grammar,
                                              custom_logit_processor=processor)
                single = len(prompts) == 1 and params.n == 1
                rid_ij = base if single else f"{base}-{i * params.n + j}"
                group = f"{base}/{i}" if params.n > 1 else None
                sequences.append(Sequence(Job(rid_ij, input_ids, sampling, options, deadline, group, images), arrival))
        return sequences

    async def _run(self, sequences: list[Sequence]) -> None:
        try:
            await Generation(self.frontend, sequences, self.metrics).run_to_end()
        except RequestError as err:
            raise http_error(err) from None
        for sequence in sequences:
            error = abort_error(sequence)
            if error is not None:
                raise error

    async def _stream(self, sequences: list[Sequence], view, include_usage: bool) -> StreamingResponse:
        def render(index: int, update) -> bytes:
            error = abort_error(sequences[index])
            if error is not None:
                raise error
            return b"".join(view.chunks(index, update, sequences[index]))

        def epilogue() -> bytes:
            return b"".join(view.usage_chunk(sequences)) if include_usage else b""

        return await start_sse(Generation(self.frontend, sequences, self.metrics), render, epilogue)

    async def _encode(self, text: str, field: str) -> list[int]:
        try:
            ids = await self.frontend.encode_async(text, field)
        except RequestError as err:
            raise HttpError(err.status, err.message, field) from None
        check_prompt(ids, self.model_info.vocab_size, self.model_info.context_length, field)
        return ids

    def token_text(self, token_id: int) -> str:
        return self.frontend.decode([token_id])



def _check_n(n: int | None) -> None:
    """n is checked before the prompts are tokenized: it bounds the work one request can queue."""
    if n is not None and not 1 <= n <= MAX_N:
        raise HttpError(400, f"n: must be in [1, {MAX_N}], got {n}", "n")


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _with_null_reasoning(delta: dict) -> dict:
    """A delta without text names reasoning_content (null), as SGLang's do: its clients read
    `delta.content or delta.reasoning_content` on every chunk, and the openai client has no such attribute
    unless the server sent it."""
    if not isinstance(delta.get("content"), str) and "reasoning_content" not in delta:
        return {**delta, "content": delta.get("content"), "reasoning_content": None}
    return delta


def _finish_reason(sequence: Sequence, called_tools: bool = False) -> str | None:
    finish = sequence.finish
    if finish is None:
        return None
    return "tool_calls" if called_tools and finish.type == "stop" else finish.type  # "abort": a requested abort


def _matched_stop(sequence: Sequence):
    finish = sequence.finish
    return finish.matched if finish is not None and finish.type == "stop" else None


def _usage(sequences: list[Sequence], n: int) -> dict:
    prompt = sum(s.prompt_tokens for s in sequences[::n])  # a prompt counts once, whatever n
    cached = sum(s.cached_tokens for s in sequences[::n])
    completion = sum(s.completion_tokens for s in sequences)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class _CompletionView:
    """Renders /v1/completions responses and stream chunks."""

    def __init__(self, api: OpenAIApi, request_id: str, n: int, echo_texts: list[str | None] | None, top: int | None):
        self.api = api
        self.id = request_id
        self.n = n
        self.echo_texts = echo_texts
        self.top = top
        self.created = int(time.time())
        self.offsets: dict[int, int] = {}  # per choice: characters sent so far (logprobs' text_offset)
        self.echoed: set[int] = set()

    def _prompt_text(self, index: int, sequence: Sequence) -> str:
        text = self.echo_texts[index // self.n]
        return text if text is not None else self.api.frontend.decode(sequence.job.input_ids)

    def response(self, sequences: list[Sequence]) -> dict:
        choices = []
        for index, sequence in enumerate(sequences):
            text = sequence.text
            logprobs = None
            if self.top is not None:
                with_prompt = self.echo_texts is not None
                logprobs = self._logprobs(index, sequence, sequence.logprobs, 0, with_prompt)
            if self.echo_texts is not None:
                text = self._prompt_text(index, sequence) + text
            choices.append({"index": index, "text": text, "logprobs": logprobs,
                            "finish_reason": _finish_reason(sequence), "matched_stop": _matched_stop(sequence)})
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.api.frontend.served_model_name, "choices": choices, "usage": _usage(sequences, self.n)}

    def chunks(self, index: int, update, sequence: Sequence) -> list[bytes]:
        text = update.text_delta
        first = index not in self.echoed
        self.echoed.add(index)
        with_prompt = first and self.echo_texts is not None
        if with_prompt:
            text = self._prompt_text(index, sequence) + text
        logprobs = None
        if self.top is not None:
            run = update.logprobs or TokenLogprobs()
            logprobs = self._logprobs(index, sequence, run, self.offsets.get(index, 0), with_prompt)
        if not text and logprobs is None and update.finish is None:
            return []
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": _finish_reason(sequence),
                  "matched_stop": _matched_stop(sequence)}
        return [sse_event({"id": self.id, "object": "text_completion", "created": self.created,
                           "model": self.api.frontend.served_model_name, "choices": [choice]})]

    def usage_chunk(self, sequences: list[Sequence]) -> list[bytes]:
        return [sse_event({"id": self.id, "object": "text_completion", "created": self.created,
                           "model": self.api.frontend.served_model_name, "choices": [],
                           "usage": _usage(sequences, self.n)})]

    def _logprobs(self, index: int, sequence: Sequence, run: TokenLogprobs, offset: int, with_prompt: bool) -> dict:
        """OpenAI's legacy layout: tokens, token_logprobs, top_logprobs (token -> logprob), text_offset."""
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []

        def add(token_ids, logprobs, top_ids, top_lps):
            nonlocal offset
            missing = len(token_ids) - len(logprobs)
            values = [None] * missing + list(logprobs)
            tops = [None] * (len(token_ids) - len(top_ids)) + [
                {self.api.token_text(t): lp for t, lp in zip(ids, lps)} for ids, lps in zip(top_ids, top_lps)]
            for token_id, value, top in zip(token_ids, values, tops):
                text = self.api.token_text(token_id)
                tokens.append(text)
                token_logprobs.append(value)
                top_logprobs.append(top if self.top else None)
                text_offset.append(offset)
                offset += len(text)

        if with_prompt:
            prompt = sequence.prompt_logprobs or TokenLogprobs(token_ids=sequence.job.input_ids)
            add(prompt.token_ids, prompt.logprobs, prompt.top_ids, prompt.top_logprobs)
        add(run.token_ids, run.logprobs, run.top_ids, run.top_logprobs)
        self.offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}


class _ChatView:
    """Renders /v1/chat/completions responses and stream chunks."""

    def __init__(self, api: OpenAIApi, request_id: str, logprobs: bool, output: ChatOutputParser | None = None):
        self.api = api
        self.id = request_id
        self.logprobs = logprobs
        self.output = output  # reads reasoning and tool calls out of the text; None: the text is the content
        self.created = int(time.time())
        self.started: set[int] = set()
        self.streams: dict[int, ChatOutputStream] = {}

    def response(self, sequences: list[Sequence]) -> dict:
        choices = []
        for index, sequence in enumerate(sequences):
            if self.output is None:
                message = {"role": "assistant", "content": sequence.text, "tool_calls": None}
            else:
                message = self.output.message(sequence.text)
            choices.append({
                "index": index,
                "message": message,
                "logprobs": self._logprobs(sequence.logprobs) if self.logprobs else None,
                "finish_reason": _finish_reason(sequence, bool(message["tool_calls"])),
                "matched_stop": _matched_stop(sequence),
            })
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.api.frontend.served_model_name, "choices": choices,
                "usage": _usage(sequences, len(sequences))}

    def chunks(self, index: int, update, sequence: Sequence) -> list[bytes]:
        out = []
        if index not in self.started:
            self.started.add(index)
            out.append(self._chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}))
        has_logprobs = self.logprobs and update.logprobs is not None and update.logprobs.token_ids
        logprobs = self._logprobs(update.logprobs or TokenLogprobs()) if self.logprobs else None
        if self.output is None:
            deltas = [{"content": update.text_delta}] if update.text_delta or has_logprobs else []
        else:
            stream = self.streams.setdefault(index, ChatOutputStream(self.output))
            deltas = stream.feed(sequence.text, update.finish is not None)
            if has_logprobs and not deltas:
                deltas = [{}]
        for k, delta in enumerate(deltas):  # the update's logprobs go with its first delta
            out.append(self._chunk({"index": index, "delta": _with_null_reasoning(delta),
                                    "logprobs": logprobs if k == 0 else None, "finish_reason": None}))
        if update.finish is not None:
            called = index in self.streams and self.streams[index].has_calls
            out.append(self._chunk({"index": index, "delta": _with_null_reasoning({}), "logprobs": None,
                                    "finish_reason": _finish_reason(sequence, called),
                                    "matched_stop": _matched_stop(sequence)}))
        return out

    def usage_chunk(self, sequences: list[Sequence]) -> list[bytes]:
        return [self._chunk(None, _usage(sequences, len(sequences)))]

    def _chunk(self, choice: dict | None, usage: dict | None = None) -> bytes:
        payload = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.api.frontend.served_model_name, "choices": [] if choice is None else [choice]}
        if usage is not None:
            payload["usage"] = usage
        return sse_event(payload)

    def _logprobs(self, run: TokenLogprobs) -> dict:
        content = []
        for i, (token_id, logprob) in enumerate(zip(run.token_ids, run.logprobs)):
            text = self.api.token_text(token_id)
            tops = []
            if i < len(run.top_ids):
                for top_id, top_lp in zip(run.top_ids[i], run.top_logprobs[i]):
                    top_text = self.api.token_text(top_id)
                    tops.append({"token": top_text, "logprob": top_lp, "bytes": list(top_text.encode())})
            content.append({"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": tops})
        return {"content": content}
