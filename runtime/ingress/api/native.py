"""The native API, SGLang's wire format: /generate, /health, /health_generate,
/get_model_info, /get_server_info, /flush_cache, /metrics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import uuid

import msgspec

from httpd import HttpError, Request, Response, StreamingResponse, json_response, text_response
from httpd.sse import sse_event
from runtime.default_model import default_model_path
from runtime.ingress.api.generation import Generation, abort_error, http_error, start_sse
from runtime.ingress.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from runtime.ingress.api.metrics import Metrics
from runtime.ingress.api.protocol import (
    MAX_N,
    NATIVE_FIELDS,
    AbortBody,
    GenerateBody,
    NativeSamplingParams,
    check_custom_logit_processor,
    check_prompt,
    check_sampling,
    check_sequence_count,
    decode_body,
    per_prompt,
    request_deadline,
    to_sampling_params,
)
from runtime.ingress.api.sequence import Job, Sequence
from runtime.ingress.api.structured import sampling_grammar
from runtime.ingress.errors import RequestError
from runtime.ingress.frontend import Frontend
from runtime.ingress.model_identity import gguf_model_id
from runtime.messages import LogprobOptions, SamplingParams, TokenLogprobs
from runtime.multimodal.inputs import ProcessedPrompt
from runtime.multimodal.media import ImageRef, MediaError

logger = logging.getLogger(__name__)

NATIVE_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's
HEALTH_GENERATE_TIMEOUT_S = 20.0
_HEALTHY = Response(200, b"", None)  # shared: the HTTP layer only reads responses
_UNSUPPORTED_INPUTS = ("input_embeds", "image_data", "audio_data", "video_data", "lora_path")


class NativeApi:
    def __init__(self, frontend: Frontend, metrics: Metrics | None):
        self.frontend = frontend
        self.metrics = metrics
        self.model_info = frontend.model_info
        model_path = frontend.args.model_path or default_model_path()
        self._gguf_model_id = concurrent.futures.Future()  # computed once, off the event loop
        threading.Thread(target=_resolve, args=(self._gguf_model_id, gguf_model_id, model_path),
                         name="gguf-model-id", daemon=True).start()

    # ------------------------------------------------------------------ /generate

    async def generate(self, request: Request) -> Response | StreamingResponse:
        arrival = time.perf_counter()
        body: GenerateBody = decode_body(request.body, GenerateBody)
        args = self.frontend.args
        deadline = request_deadline(body.timeout, args.request_timeout, time.monotonic())
        if body.return_text_in_logprobs and self.frontend.tokenizer is None:
            raise HttpError(400, "return_text_in_logprobs: needs the tokenizer; the server runs with "
                                 "--skip-tokenizer-init", "return_text_in_logprobs")
        check_sequence_count(_sequence_count(body), args.max_seqs_per_request, "text or input_ids (prompts x n)")
        prompts, is_batch = await self._prompts(body)
        images = await prompt_images(self.frontend.vision, body, prompts, is_batch)
        count = len(prompts)
        sampling = per_prompt(body.sampling_params, count, "sampling_params", is_batch)
        rids = per_prompt(body.rid, count, "rid", is_batch)
        return_logprob = per_prompt(body.return_logprob, count, "return_logprob", is_batch)
        start_lens = per_prompt(body.logprob_start_len, count, "logprob_start_len", is_batch)
        top_nums = per_prompt(body.top_logprobs_num, count, "top_logprobs_num", is_batch)
        id_lists = token_ids_logprob_per_prompt(body.token_ids_logprob, count, is_batch)
        processors_given = body.custom_logit_processor
        processors = per_prompt(processors_given, count, "custom_logit_processor", is_batch)

        sequences: list[Sequence] = []
        for i, input_ids in enumerate(prompts):
            params = sampling[i] or NativeSamplingParams()
            check_sampling(params, self.model_info.vocab_size, NATIVE_FIELDS)
            grammar = sampling_grammar(self.frontend, params, NATIVE_FIELDS)
            field = ("text" if body.text is not None else "input_ids") + (f"[{i}]" if is_batch else "")
            check_prompt(input_ids, self.model_info.vocab_size, self.model_info.context_length, field)
            options = logprob_options(return_logprob[i], start_lens[i], top_nums[i], len(input_ids),
                                       self.model_info.vocab_size, id_lists[i])
            rid = rids[i] if rids[i] is not None else os.urandom(16).hex()  # uuid4().hex costs 4x more
            processor_field = "custom_logit_processor" + (f"[{i}]" if isinstance(processors_given, list) else "")
            processor = check_custom_logit_processor(processors[i], args.enable_custom_logit_processor, processor_field)
            for j in range(params.n):
                params_j = to_sampling_params(params, len(input_ids), self.model_info.context_length, NATIVE_FIELDS,
                                              NATIVE_DEFAULT_MAX_NEW_TOKENS, seed_offset=j, grammar=grammar,
                                              custom_logit_processor=processor)
                job = Job(rid if params.n == 1 else f"{rid}-{j}", input_ids, params_j, options, deadline,
                          group=rid if params.n > 1 else None, images=images[i])
                sequences.append(Sequence(job, arrival))

        if len({s.job.rid for s in sequences}) != len(sequences):
            raise HttpError(400, "rid: the ids of one request must be distinct", "rid")
        as_list = is_batch or len(sequences) > 1
        generation = Generation(self.frontend, sequences, self.metrics)
        if body.stream:
            return await self._stream(generation, as_list, body.return_text_in_logprobs)
        try:
            await generation.run_to_end()
        except RequestError as err:
            raise http_error(err) from None
        outputs = [self._output(s, body.return_text_in_logprobs) for s in sequences]
        return json_response(outputs if as_list else outputs[0])

    async def _prompts(self, body: GenerateBody) -> tuple[list[list[int]], bool]:
        for name in _UNSUPPORTED_INPUTS:
            if name == "image_data" and self.frontend.vision is not None:
                continue
            if getattr(body, name) is not None:
                raise HttpError(400, f"{name}: not supported yet by this server", name)
        if body.return_hidden_states:
            raise HttpError(400, "return_hidden_states: not supported yet by this server", "return_hidden_states")
        if (body.text is None) == (body.input_ids is None):
            raise HttpError(400, "give exactly one of text or input_ids", "text")
        if body.text is not None:
            texts = [body.text] if isinstance(body.text, str) else body.text
            if not texts:
                raise HttpError(400, "text: the batch is empty", "text")
            prompts = []
            for i, text in enumerate(texts):
                field = f"text[{i}]" if isinstance(body.text, list) else "text"
                if not text:
                    raise HttpError(400, f"{field}: the prompt is empty", field)
                prompts.append(await _encode(self.frontend, text, field))
            return prompts, isinstance(body.text, list)
        ids = body.input_ids
        if not ids:
            raise HttpError(400, "input_ids: the prompt is empty", "input_ids")
        if all(isinstance(x, int) for x in ids):
            return [ids], False
        if all(isinstance(x, list) for x in ids):
            return ids, True
        raise HttpError(400, "input_ids: expected a list of token ids or a list of token-id lists, not a mix",
                        "input_ids")

    async def _stream(self, generation: Generation, as_list: bool, with_text: bool) -> StreamingResponse:
        sequences = generation.sequences

        def render(index: int, update) -> bytes:
            out = self._output(sequences[index], with_text)
            if as_list:
                out["index"] = index
            return sse_event(out)

        return await start_sse(generation, render, bytes)

    def _output(self, sequence: Sequence, with_text: bool) -> dict:
        job, finish, counts = sequence.job, sequence.finish, sequence.meta
        error = abort_error(sequence)
        if error is not None:
            raise error
        meta = {
            "id": job.rid,
            "finish_reason": None if finish is None else finish_dict(finish),
            "prompt_tokens": counts.prompt_tokens,
            "completion_tokens": counts.completion_tokens,
            "cached_tokens": counts.cached_tokens,
            "e2e_latency": time.perf_counter() - sequence.arrival,
        }
        if sequence.timestamps:  # --enable-token-timestamps
            scheduler, detokenizer = sequence.timestamps
            meta["timestamps"] = {"scheduler": scheduler, "detokenizer": detokenizer, "ingress": time.monotonic()}
        if job.logprobs.return_logprob:
            decode = self._token_text if with_text else None
            prompt = sequence.prompt_logprobs or TokenLogprobs()
            meta["input_token_logprobs"] = logprob_triples(prompt.token_ids, prompt.logprobs, decode)
            meta["output_token_logprobs"] = logprob_triples(sequence.logprobs.token_ids, sequence.logprobs.logprobs,
                                                            decode)
            meta["input_top_logprobs"] = top_logprob_triples(prompt, len(prompt.token_ids), decode)
            meta["output_top_logprobs"] = top_logprob_triples(sequence.logprobs, len(sequence.logprobs.token_ids),
                                                              decode)
            wanted = job.logprobs.token_ids_logprob
            if wanted:
                meta["input_token_ids_logprobs"] = ids_logprob_triples(prompt, wanted, decode)
                meta["output_token_ids_logprobs"] = ids_logprob_triples(sequence.logprobs, wanted, decode)
        return {"text": sequence.text, "output_ids": sequence.output_ids, "meta_info": meta}

    def _token_text(self, token_id: int) -> str:
        return self.frontend.decode([token_id])

    # ------------------------------------------------------------------ the rest

    def health(self, request: Request) -> Response:
        """200 while the engine's actors beat and no batch is stuck on the workers; else 503 with the reason."""
        reason = self.frontend.health()
        if reason is not None:
            raise HttpError(503, f"unhealthy: {reason}")
        return _HEALTHY

    async def health_generate(self, request: Request) -> Response:
        """Healthy when one token really comes out of the engine (an embedding server: one vector)."""
        input_ids = await _encode(self.frontend, "Hi", "text") if self.frontend.tokenizer is not None else [0]
        if self.model_info.is_embedding:
            return await self._health_embed(input_ids)
        sequence = Sequence(Job(f"health-{uuid.uuid4().hex}", input_ids, SamplingParams(max_new_tokens=1),
                                LogprobOptions()), time.perf_counter())
        generation = Generation(self.frontend, [sequence], None)
        try:
            await asyncio.wait_for(generation.run_to_end(), HEALTH_GENERATE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise HttpError(503, f"no token generated within {HEALTH_GENERATE_TIMEOUT_S:g} s") from None
        except RequestError as err:
            raise HttpError(503, f"the engine refused a one-token request: {err.message}") from None
        if sequence.finish is None or sequence.finish.type == "abort":
            raise HttpError(503, "the one-token health request was aborted")
        return _HEALTHY

    async def _health_embed(self, input_ids: list[int]) -> Response:
        try:
            await asyncio.wait_for(self.frontend.embed(f"health-{uuid.uuid4().hex}", input_ids),
                                   HEALTH_GENERATE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise HttpError(503, f"no embedding within {HEALTH_GENERATE_TIMEOUT_S:g} s") from None
        except RequestError as err:
            raise HttpError(503, f"the engine refused a one-vector request: {err.message}") from None
        return _HEALTHY

    async def get_model_info(self, request: Request) -> Response:
        args, info = self.frontend.args, self.model_info
        model_path = args.model_path or default_model_path()  # the server runs, so the default model exists
        model_id = await asyncio.wrap_future(self._gguf_model_id)
        return json_response({
            "model_path": model_id or model_path,  # a GGUF file: the id of its model (model_identity.py)
            "tokenizer_path": args.tokenizer_path or model_path,
            "gguf_file": model_path if model_id else None,
            "is_generation": not info.is_embedding,
            "served_model_name": self.frontend.served_model_name,
            "architectures": [info.architecture],
            "context_length": info.context_length,
            "vocab_size": info.vocab_size,
            "eos_token_ids": info.eos_token_ids,
            "dtype": info.dtype,
            "device": info.device,
        })

    async def get_server_info(self, request: Request) -> Response:
        args = msgspec.to_builtins(self.frontend.args)
        if args.get("api_key"):
            args["api_key"] = "<redacted>"
        states = await self._replica_states()
        # SGLang's top-level name for the KV capacity, in tokens (of one replica, as each serves alone)
        capacity = min((s["max_total_tokens"] for s in states if "max_total_tokens" in s), default=None)
        return json_response({**args, "model_info": msgspec.to_builtins(self.model_info),
                              "max_total_num_tokens": capacity, "internal_states": states, "version": _version()})

    def abort_request(self, request: Request) -> Response:
        """SGLang's POST /abort_request {"rid": ...}: end that request (its caller gets finish type
        "abort"); {"abort_all": true} ends every request. Unknown rids are ignored, as in SGLang."""
        body: AbortBody = decode_body(request.body, AbortBody)
        if body.abort_all:
            self.frontend.abort_all()
        elif body.rid:
            self.frontend.abort(body.rid)
        else:
            raise HttpError(400, "give rid (a request id) or abort_all: true", "rid")
        return _HEALTHY

    async def flush_cache(self, request: Request) -> Response:
        try:
            ok, message = await self.frontend.flush_cache()
        except RequestError as err:
            raise http_error(err) from None
        if not ok:
            raise HttpError(400, f"cache not flushed: {message or 'requests are running'}")
        return text_response(f"Cache flushed.{' ' + message if message else ''}\n")

    async def metrics_text(self, request: Request) -> Response:
        return Response(200, self.metrics.render(await self._replica_states()), METRICS_CONTENT_TYPE)

    async def _replica_states(self) -> list[dict]:
        """One scheduler state per data-parallel replica (SGLang's internal_states)."""
        try:
            return await self.frontend.replica_states()
        except RequestError as err:
            raise http_error(err) from None


# ---------------------------------------------------------------------- helpers shared with openai.py


def _resolve(future: concurrent.futures.Future, fn, *args) -> None:
    try:
        future.set_result(fn(*args))
    except Exception as err:
        future.set_exception(err)


async def _encode(frontend, text: str, field: str) -> list[int]:
    try:
        return await frontend.encode_async(text, field)
    except RequestError as err:
        raise HttpError(err.status, err.message, field) from None


async def prompt_images(vision, body: GenerateBody, prompts: list[list[int]], is_batch: bool
                        ) -> list[ProcessedPrompt | None]:
    """SGLang's image_data (a string or a list of them per prompt: base64, data URL, path or URL; for a batch, one
    such entry per prompt): each text prompt with images is processed again with them, replacing its ids."""
    out: list[ProcessedPrompt | None] = [None] * len(prompts)
    if body.image_data is None:
        return out
    if vision is None:
        raise HttpError(400, "image_data: this model takes no images (not a vision language model)", "image_data")
    if body.text is None:
        raise HttpError(400, "image_data: needs `text` (the image placeholders are expanded from the text)",
                        "image_data")
    if is_batch:
        if not isinstance(body.image_data, list) or len(body.image_data) != len(prompts):
            raise HttpError(400, f"image_data: for a batch of {len(prompts)} texts, a list of as many entries",
                            "image_data")
        entries = [(e, f"image_data[{i}]") for i, e in enumerate(body.image_data)]
    else:
        entries = [(body.image_data, "image_data")]
    texts = body.text if is_batch else [body.text]
    for i, (entry, field) in enumerate(entries):
        if entry is None:
            continue
        sources = entry if isinstance(entry, list) else [entry]
        refs = [ImageRef(s, f"{field}[{k}]" if isinstance(entry, list) else field) for k, s in enumerate(sources)]
        try:
            out[i] = await vision.prompt(texts[i], refs)
        except MediaError as err:
            raise HttpError(err.status, str(err), err.field) from None
        prompts[i] = out[i].input_ids
    return out


def _sequence_count(body: GenerateBody) -> int:
    """Prompts x n of a /generate body, counted before any tokenizing (n outside 1..MAX_N: 400 here)."""
    if isinstance(body.text, list):
        prompts = len(body.text)
    elif body.input_ids and all(isinstance(x, list) for x in body.input_ids):
        prompts = len(body.input_ids)
    else:
        prompts = 1
    params = body.sampling_params
    per_prompt_params = params if isinstance(params, list) else [params] * prompts
    for p in per_prompt_params:
        if p is not None and not 1 <= p.n <= MAX_N:
            raise HttpError(400, f"sampling_params.n: must be in [1, {MAX_N}], got {p.n}", "sampling_params.n")
    return sum(1 if p is None else p.n for p in per_prompt_params)


def logprob_options(return_logprob: bool, start_len: int, top_num: int, prompt_len: int,
                     vocab_size: int, token_ids: list[int] | None = None) -> LogprobOptions:
    if not return_logprob:
        if token_ids:
            raise HttpError(400, "token_ids_logprob: needs return_logprob", "token_ids_logprob")
        return LogprobOptions()
    for token_id in token_ids or ():
        if not 0 <= token_id < vocab_size:
            raise HttpError(400, f"token_ids_logprob: {token_id} is not a token id (vocabulary size {vocab_size})",
                            "token_ids_logprob")
    if not -1 <= start_len < prompt_len:
        raise HttpError(400, f"logprob_start_len: must be -1 (no prompt logprobs) or in [0, {prompt_len}) for a "
                             f"prompt of {prompt_len} tokens, got {start_len}", "logprob_start_len")
    if not 0 <= top_num <= vocab_size:
        raise HttpError(400, f"top_logprobs_num: must be in [0, {vocab_size}], got {top_num}", "top_logprobs_num")
    return LogprobOptions(True, start_len, top_num, list(token_ids or ()))


def token_ids_logprob_per_prompt(value, count: int, is_batch: bool) -> list[list[int] | None]:
    """SGLang's token_ids_logprob: one list of ids for every prompt, or (a batch) one list per prompt."""
    if value is None or not value:
        return [None] * count
    if all(isinstance(x, int) for x in value):
        return [list(value)] * count
    if all(isinstance(x, list) for x in value):
        return per_prompt(value, count, "token_ids_logprob", is_batch)
    raise HttpError(400, "token_ids_logprob: expected a list of token ids or, for a batch, a list of such lists",
                    "token_ids_logprob")


def ids_logprob_triples(run: TokenLogprobs, wanted: list[int], decode) -> list:
    """Per position, [logprob, token_id, text] for each id of token_ids_logprob; None where the position
    has no logprobs (the first prompt token)."""
    out: list = [None] * (len(run.token_ids) - len(run.ids_logprobs))
    for values in run.ids_logprobs:
        out.append([[lp, tid, decode(tid) if decode else None] for lp, tid in zip(values, wanted)])
    return out


def finish_dict(finish) -> dict:
    out = {"type": finish.type}
    for key in ("matched", "length", "message"):
        value = getattr(finish, key)
        if value is not None:
            out[key] = value
    return out


def logprob_triples(token_ids: list[int], logprobs: list[float], decode) -> list[list]:
    """SGLang's layout: [logprob, token_id, text or None] per token. When the engine sends fewer
    logprobs than tokens (the first prompt token has none), the leading entries get None."""
    missing = len(token_ids) - len(logprobs)
    values = [None] * missing + list(logprobs)
    return [[lp, tid, decode(tid) if decode else None] for lp, tid in zip(values, token_ids)]


def top_logprob_triples(run: TokenLogprobs, positions: int, decode) -> list:
    missing = positions - len(run.top_ids)
    out: list = [None] * missing
    for ids, lps in zip(run.top_ids, run.top_logprobs):
        out.append([[lp, tid, decode(tid) if decode else None] for lp, tid in zip(lps, ids)])
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("runtime")
    except PackageNotFoundError:
        return "0.0.0"
