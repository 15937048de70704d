"""`runtime.Engine`: the serving engine in the caller's process, without HTTP (SGLang's offline API).

    llm = runtime.Engine(model_path=...)          # any ServerArgs field as a keyword
    outputs = llm.generate(["Hello, my name is"], {"temperature": 0.8, "top_p": 0.95})
    print(outputs[0]["text"])
    llm.shutdown()                                 # or: with runtime.Engine(...) as llm: ...

The actor processes are the server's (workers, scheduler, detokenizer, started by the launcher's
Deployment); this process plays the ingress: a Frontend on a private asyncio loop in a thread,
fed by the detokenizer's and the scheduler's rings. Requests and outputs have the native API's
shape (POST /generate): validation, defaults and the output dict are the same.

Threads: start the Engine from a thread that lives as long as it (the actors die with the thread
that started them, PR_SET_PDEATHSIG). generate() may be called from any thread; async_generate()
from any event loop (the call is bridged to the Engine's loop).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager
from typing import Any

import msgspec

from actors.aio import AsyncMailbox
from actors.mailbox import Mailbox
from httpd import HttpError, Request
from runtime.ingress.api.embeddings import EmbeddingsApi
from runtime.ingress.api.generation import Generation
from runtime.ingress.api.native import (
    NATIVE_DEFAULT_MAX_NEW_TOKENS,
    finish_dict,
    ids_logprob_triples,
    logprob_options,
    logprob_triples,
    prompt_images,
    token_ids_logprob_per_prompt,
    top_logprob_triples,
)
from runtime.ingress.api.protocol import (
    CUSTOM_LOGIT_PROCESSOR_REFUSED,
    NATIVE_FIELDS,
    GenerateBody,
    NativeSamplingParams,
    check_custom_logit_processor,
    check_prompt,
    check_sampling,
    per_prompt,
    to_sampling_params,
)
from runtime.ingress.api.sequence import Job, Sequence
from runtime.ingress.api.structured import sampling_grammar
from runtime.ingress.errors import RequestError
from runtime.ingress.frontend import Frontend
from runtime.launcher import Deployment
from runtime.messages import TokenLogprobs
from runtime.model_loader.hub import resolve_model_paths
from runtime.server_args import ServerArgs, ServerArgsError, validate
from runtime.tokenizer import load_tokenizer
from shm import Arena, run_prefix

_UNSUPPORTED = ("lora_path",)


class EngineError(RuntimeError):
    """A request failed in the engine (aborted, overloaded, or the engine stopped)."""


def _user_error(status: int, message: str) -> Exception:
    """400s are the caller's mistake (ValueError naming the field); the rest are the engine's."""
    return ValueError(message) if status == 400 else EngineError(message)


def server_args_from(server_args: ServerArgs | None, kwargs: dict) -> ServerArgs:
    if server_args is not None and kwargs:
        raise TypeError(f"give either server_args or keyword arguments, not both (got {sorted(kwargs)})")
    if server_args is None:
        unknown = sorted(set(kwargs) - set(ServerArgs.__struct_fields__))
        if unknown:
            raise TypeError(f"Engine() got unknown argument(s) {unknown}; they must be ServerArgs fields "
                            f"(see runtime/server_args.py)")
        try:
            server_args = msgspec.convert(kwargs, ServerArgs)
        except msgspec.ValidationError as err:
            raise ValueError(f"Engine(): {err}") from None
    try:
        return validate(msgspec.structs.replace(server_args))
    except ServerArgsError as err:
        raise ValueError(str(err)) from None


class Engine:
    def __init__(self, server_args: ServerArgs | None = None, **kwargs: Any):
        self.server_args = resolve_model_paths(server_args_from(server_args, kwargs))  # hub ids: HubError
        if self.server_args.node_rank != 0:
            raise ValueError("--node-rank > 0 runs only workers: start those nodes with `python -m runtime`")
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channels: list = []
        # A prefix of our own: several Engines may live in one process.
        self._deployment = Deployment(self.server_args, with_http=False,
                                      prefix=f"{run_prefix()}{uuid.uuid4().hex[:8]}_", on_failure=self._on_failure)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            tokenizer = pool.submit(load_tokenizer, self.server_args)  # while the model loads
            try:
                self.model_info = self._deployment.start()
                tokenizer = tokenizer.result()
            except BaseException:
                self._deployment.stop()
                raise
        atexit.register(self.shutdown)
        try:
            self._start_frontend(tokenizer)
        except BaseException:
            self.shutdown()
            raise

    def _start_frontend(self, tokenizer) -> None:
        to_schedulers, inbound = self._deployment.connect_as_ingress()
        self._channels = [*to_schedulers, *inbound]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="engine-loop", daemon=True)
        self._thread.start()
        vision = None
        if self._deployment.image_arenas:
            from runtime.multimodal.inputs import VisionInputs

            vision = VisionInputs(self.server_args, [Arena.attach(a.name) for a in self._deployment.image_arenas])
        self.frontend = Frontend(self.server_args, self.model_info, tokenizer, to_schedulers, vision)

        async def start_mailbox() -> AsyncMailbox:
            return AsyncMailbox(Mailbox(inbound), self.frontend.on_message).start()

        self._mailbox = self._call(start_mailbox())

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: str | list[str] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool | list[bool] = False,
                 logprob_start_len: int | list[int] | None = None, top_logprobs_num: int | list[int] | None = None,
                 stream: bool = False, token_ids_logprob: list[int] | list[list[int]] | None = None,
                 custom_logit_processor: Any = None, **unsupported: Any) -> dict | list[dict] | Iterator[dict]:
        """The output dict of POST /generate ({"text", "output_ids", "meta_info"}) for one prompt, a
        list of them for a list of prompts (or n > 1). With stream=True an iterator of such dicts
        with the text so far (each with "index" when there are several sequences). `image_data` (a vision language
        model): as /generate takes it (docs/multimodal.md)."""
        body = self._body(prompt, sampling_params, input_ids, return_logprob, logprob_start_len, top_logprobs_num,
                          stream, token_ids_logprob, custom_logit_processor, unsupported)
        if stream:
            return self._sync_stream(self._stream(body))
        return self._call(self._generate(body))

    async def async_generate(self, prompt: str | list[str] | None = None,
                             sampling_params: dict | list[dict] | None = None,
                             input_ids: list[int] | list[list[int]] | None = None,
                             return_logprob: bool | list[bool] = False,
                             logprob_start_len: int | list[int] | None = None,
                             top_logprobs_num: int | list[int] | None = None, stream: bool = False,
                             token_ids_logprob: list[int] | list[list[int]] | None = None,
                             custom_logit_processor: Any = None,
                             **unsupported: Any) -> dict | list[dict] | AsyncIterator[dict]:
        """generate() for asyncio callers (any loop). With stream=True, an async iterator."""
        body = self._body(prompt, sampling_params, input_ids, return_logprob, logprob_start_len, top_logprobs_num,
                          stream, token_ids_logprob, custom_logit_processor, unsupported)
        if stream:
            return self._async_stream(self._stream(body))
        return await asyncio.wrap_future(self._submit(self._generate(body)))

    def encode(self, prompt: str | list[str] | None = None, input_ids: list[int] | list[list[int]] | None = None,
               rid: str | list[str] | None = None) -> dict | list[dict]:
        """The output of POST /encode ({"embedding": [...], "meta_info": {...}}) for one input, a list for a list.
        Any model embeds: an --is-embedding model as its checkpoint pools, a generation model its last token."""
        body = {key: value for key, value in (("text", prompt), ("input_ids", input_ids), ("rid", rid))
                if value is not None}
        request = Request("POST", "/encode", "", [], msgspec.json.encode(body), "1.1", True)
        response = self._call(self._frontend_call(EmbeddingsApi(self.frontend).encode(request)))
        return msgspec.json.decode(response.body)

    def get_server_info(self) -> dict:
        """Server args, the model facts and the scheduler's state (as GET /get_server_info)."""
        states = self._call(self._frontend_call(self.frontend.replica_states()))
        return {**msgspec.to_builtins(self.server_args), "model_info": msgspec.to_builtins(self.model_info),
                "internal_states": states}

    def flush_cache(self) -> bool:
        """Empty the radix cache; False (with nothing done) while requests are running."""
        ok, _ = self._call(self._frontend_call(self.frontend.flush_cache()))
        return ok

    # ------------------------------------------------------------------ request building (as /generate)

    def _body(self, prompt, sampling_params, input_ids, return_logprob, logprob_start_len, top_logprobs_num, stream,
              token_ids_logprob, custom_logit_processor, unsupported: dict) -> GenerateBody:
        image_data = unsupported.pop("image_data", None)  # SGLang's Engine argument (a vision language model)
        for name, value in unsupported.items():
            if name not in _UNSUPPORTED:
                raise TypeError(f"generate() got an unexpected keyword argument {name!r}")
            if value is not None:
                raise ValueError(f"{name}: not supported yet by this engine")
        if custom_logit_processor is not None and not self.server_args.enable_custom_logit_processor:
            raise ValueError(CUSTOM_LOGIT_PROCESSOR_REFUSED)
        if self._closed:
            raise EngineError("the engine was shut down")
        raw = {"text": prompt, "input_ids": input_ids, "sampling_params": sampling_params,
               "return_logprob": return_logprob, "stream": stream, "token_ids_logprob": token_ids_logprob,
               "custom_logit_processor": custom_logit_processor,
               "logprob_start_len": -1 if logprob_start_len is None else logprob_start_len,
               "top_logprobs_num": 0 if top_logprobs_num is None else top_logprobs_num, "image_data": image_data}
        try:
            return msgspec.convert(raw, GenerateBody)
        except msgspec.ValidationError as err:  # names the field: "... - at `$.sampling_params.top_p`"
            raise ValueError(f"invalid request: {err}") from None

    async def _sequences(self, body: GenerateBody) -> tuple[list[Sequence], bool]:
        """One Sequence per (prompt, n); the same checks and defaults as POST /generate."""
        arrival = time.perf_counter()
        info = self.model_info
        if (body.text is None) == (body.input_ids is None):
            raise ValueError("give exactly one of prompt or input_ids")
        if body.text is not None:
            is_batch = isinstance(body.text, list)
            texts = body.text if is_batch else [body.text]
            prompts = []
            for i, text in enumerate(texts):
                if not text:
                    raise ValueError(f"prompt{f'[{i}]' if is_batch else ''}: the prompt is empty")
                prompts.append(self.frontend.encode(text))
        else:
            is_batch = bool(body.input_ids) and all(isinstance(x, list) for x in body.input_ids)
            prompts = body.input_ids if is_batch else [body.input_ids]
        if not prompts:
            raise ValueError("prompt: the batch is empty")
        images = await prompt_images(self.frontend.vision, body, prompts, is_batch)
        count = len(prompts)
        sampling = per_prompt(body.sampling_params, count, "sampling_params", is_batch)
        return_logprob = per_prompt(body.return_logprob, count, "return_logprob", is_batch)
        start_lens = per_prompt(body.logprob_start_len, count, "logprob_start_len", is_batch)
        top_nums = per_prompt(body.top_logprobs_num, count, "top_logprobs_num", is_batch)
        id_lists = token_ids_logprob_per_prompt(body.token_ids_logprob, count, is_batch)
        processors = per_prompt(body.custom_logit_processor, count, "custom_logit_processor", is_batch)
        sequences = []
        for i, ids in enumerate(prompts):
            params = sampling[i] or NativeSamplingParams()
            check_sampling(params, info.vocab_size, NATIVE_FIELDS)
            grammar = sampling_grammar(self.frontend, params, NATIVE_FIELDS)
            check_prompt(ids, info.vocab_size, info.context_length, f"input_ids[{i}]" if is_batch else "input_ids")
            options = logprob_options(return_logprob[i], start_lens[i], top_nums[i], len(ids), info.vocab_size,
                                      id_lists[i])
            rid = uuid.uuid4().hex
            processor = check_custom_logit_processor(processors[i], self.server_args.enable_custom_logit_processor)
            for j in range(params.n):
                sampling_j = to_sampling_params(params, len(ids), info.context_length, NATIVE_FIELDS,
                                                NATIVE_DEFAULT_MAX_NEW_TOKENS, seed_offset=j, grammar=grammar,
                                                custom_logit_processor=processor)
                sequences.append(Sequence(Job(rid if params.n == 1 else f"{rid}-{j}", ids, sampling_j, options,
                                              group=rid if params.n > 1 else None, images=images[i]), arrival))
        return sequences, is_batch or len(sequences) > 1

    def _output(self, sequence: Sequence) -> dict:
        finish, counts = sequence.finish, sequence.meta
        if finish is not None and finish.type == "abort":
            raise EngineError(f"the request was aborted by the engine: {finish.message or 'no reason given'}")
        meta = {
            "id": sequence.job.rid,
            "finish_reason": None if finish is None else finish_dict(finish),
            "prompt_tokens": counts.prompt_tokens,
            "completion_tokens": counts.completion_tokens,
            "cached_tokens": counts.cached_tokens,
            "e2e_latency": time.perf_counter() - sequence.arrival,
        }
        if sequence.job.logprobs.return_logprob:
            prompt = sequence.prompt_logprobs or TokenLogprobs()
            out = sequence.logprobs
            meta["input_token_logprobs"] = logprob_triples(prompt.token_ids, prompt.logprobs, None)
            meta["output_token_logprobs"] = logprob_triples(out.token_ids, out.logprobs, None)
            meta["input_top_logprobs"] = top_logprob_triples(prompt, len(prompt.token_ids), None)
            meta["output_top_logprobs"] = top_logprob_triples(out, len(out.token_ids), None)
            wanted = sequence.job.logprobs.token_ids_logprob
            if wanted:
                meta["input_token_ids_logprobs"] = ids_logprob_triples(prompt, wanted, None)
                meta["output_token_ids_logprobs"] = ids_logprob_triples(out, wanted, None)
        return {"text": sequence.text, "output_ids": list(sequence.output_ids), "meta_info": meta}

    # ------------------------------------------------------------------ on the Engine's loop

    async def _generate(self, body: GenerateBody) -> dict | list[dict]:
        with _engine_errors():
            sequences, as_list = await self._sequences(body)
            await Generation(self.frontend, sequences, None).run_to_end()
            outputs = [self._output(s) for s in sequences]
        return outputs if as_list else outputs[0]

    async def _stream(self, body: GenerateBody) -> AsyncIterator[dict]:
        with _engine_errors():
            sequences, as_list = await self._sequences(body)
            generation = Generation(self.frontend, sequences, None)
            async with aclosing(generation.updates(True)) as updates:
                async for update in updates:
                    index = generation.fold(update)
                    out = self._output(sequences[index])
                    if as_list:
                        out["index"] = index
                    yield out

    async def _frontend_call(self, awaitable):
        with _engine_errors():
            return await awaitable

    # ------------------------------------------------------------------ thread bridging

    def _submit(self, coro) -> concurrent.futures.Future:
        if self._closed or self._loop is None:
            coro.close()
            raise EngineError("the engine was shut down")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _call(self, coro):
        future = self._submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: the request is aborted on the Engine's loop
            raise

    def _sync_stream(self, chunks: AsyncIterator[dict]) -> Iterator[dict]:
        done = object()
        try:
            while True:
                chunk = self._call(_anext(chunks, done))
                if chunk is done:
                    return
                yield chunk
        finally:  # the caller stopped early: abort the requests
            if not self._closed:
                self._call(_aclose(chunks))

    async def _async_stream(self, chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
        done = object()
        try:
            while True:
                chunk = await asyncio.wrap_future(self._submit(_anext(chunks, done)))
                if chunk is done:
                    return
                yield chunk
        finally:
            if not self._closed:
                await asyncio.wrap_future(self._submit(_aclose(chunks)))

    # ------------------------------------------------------------------ life cycle

    def _on_failure(self, reason: str) -> None:
        """An actor died (the supervisor already stopped the others): fail every request."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.frontend.close, f"the engine stopped: {reason}")
            except RuntimeError:  # the loop closed meanwhile
                pass

    def shutdown(self) -> None:
        """Stop the actor processes and free their shared memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        loop = self._loop
        if loop is not None:
            async def close_frontend():
                self.frontend.close("the engine was shut down")
                await self._mailbox.close()

            if hasattr(self, "_mailbox"):
                asyncio.run_coroutine_threadsafe(close_frontend(), loop).result()
        self._deployment.stop()
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join()
            loop.close()
        for channel in self._channels:
            channel.close()
        self._channels = []

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


@contextmanager
def _engine_errors():
    """Frontend and validation errors, as the Engine's callers see them."""
    try:
        yield
    except (HttpError, RequestError) as err:
        raise _user_error(err.status, err.message) from None


async def _anext(iterator: AsyncIterator, default):
    return await anext(iterator, default)


async def _aclose(iterator) -> None:
    await iterator.aclose()
