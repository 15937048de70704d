"""Request bodies of the native and OpenAI APIs, decoded from JSON straight into msgspec Structs,
and their validation into runtime.messages.SamplingParams.

Every failure is an httpd.HttpError(400) whose message and `param` name the field at fault:
type errors come from msgspec with their JSON path ("$.sampling_params.temperature"), range
errors from `check_sampling` below (SGLang's ranges)."""

from __future__ import annotations

import math
from typing import Any

import msgspec
from msgspec import Struct

from httpd import HttpError
from runtime import stop_regex
from runtime.messages import GrammarSpec, SamplingParams
from runtime.multimodal.media import ImageRef

MAX_N = 128  # completions per prompt (OpenAI's limit); a guard against one request fanning out without bound
MAX_STOP_STRINGS = 64  # each is matched against the output tail at every step
MAX_OPENAI_TOP_LOGPROBS = 20  # OpenAI's own limit
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
CUSTOM_LOGIT_PROCESSOR_REFUSED = (
    "custom_logit_processor: custom logit processors are disabled on this server; they are serialized Python "
    "(dill) that the server would unpickle and run, so they need --enable-custom-logit-processor, for trusted "
    "clients only")


class NativeSamplingParams(Struct, forbid_unknown_fields=True):
    """`sampling_params` of POST /generate: every key some SGLang version accepts (and `seed`, ours).
    Unknown keys are refused: a typo would silently change behaviour. null means "the default", as
    in SGLang; for max_new_tokens that is 128 (native), clamped to the context."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = 0
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = -1
    min_p: float | None = 0.0
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    repetition_penalty: float | None = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    no_stop_trim: bool | None = False
    n: int | None = 1
    seed: int | None = None
    sampling_seed: int | None = None  # SGLang's name for the seed, any signed 64-bit value
    logit_bias: dict[int, float] | None = None
    stream_interval: int | None = None  # per request; None: --stream-interval
    custom_params: dict[str, Any] | None = None  # passed to the request's custom logit processor
    beam_width: int | None = None  # beam search: only None / 1
    watermark: Any = None  # SGLang needs --enable-watermark for it; only off / null here
    # SGLang's grammar options (runtime/constrained/grammars.py); json_schema and structural_tag are JSON
    # strings as in SGLang, or the objects themselves.
    json_schema: str | dict | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | dict | None = None

    def __post_init__(self):
        for name, default in _NATIVE_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.sampling_seed is not None and self.seed is None:
            self.seed = self.sampling_seed % 2**63


_NATIVE_DEFAULTS = {name: default for name, default in zip(
    NativeSamplingParams.__struct_fields__, NativeSamplingParams.__struct_defaults__) if default is not None}



class GenerateBody(Struct):
    """POST /generate (SGLang's GenerateReqInput). A list in text / input_ids makes a batch; the
    per-request fields may then be lists of the same length."""

    text: str | list[str] | None = None
    input_ids: list[int | list[int]] | None = None
    sampling_params: NativeSamplingParams | list[NativeSamplingParams] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    timeout: float | None = None  # seconds; may only shorten --request-timeout
    # SGLang inputs we do not serve yet: refused with a clear message rather than ignored.
    input_embeds: Any = None
    image_data: Any = None
    audio_data: Any = None
    video_data: Any = None
    lora_path: Any = None
    custom_logit_processor: Any = None
    return_hidden_states: bool = False
    token_ids_logprob: list[int | list[int]] | None = None  # for every prompt, or one list per prompt


class AbortBody(Struct):
    """POST /abort_request (SGLang's AbortReq)."""

    rid: str = ""
    abort_all: bool = False


class StreamOptions(Struct):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _OpenAISampling(Struct):
    """Sampling fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then the
    SGLang/vLLM extensions). None means "not given". Unknown fields are ignored, as OpenAI does."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    rid: str | None = None
    regex: str | None = None
    json_schema: Any = None
    ebnf: str | None = None
    stop_regex: str | list[str] | None = None
    custom_logit_processor: Any = None  # see check_custom_logit_processor
    custom_params: dict[str, Any] | None = None
    timeout: float | None = None  # seconds; may only shorten --request-timeout


class ResponseFormat(Struct):
    type: str
    json_schema: Any = None
    # type "structural_tag": xgrammar's `format`, or SGLang's `structures` and `triggers`
    format: Any = None
    structures: Any = None
    triggers: Any = None


class CompletionBody(_OpenAISampling):
    """POST /v1/completions. prompt: a string, a list of strings, a list of token ids, or a list
    of token-id lists."""

    prompt: str | list[str | int | list[int]] | None = None
    max_tokens: int | None = None  # None: 16, OpenAI's default
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    response_format: ResponseFormat | None = None


class ContentPart(Struct):
    type: str
    text: str | None = None
    image_url: Any = None  # {"url": ..., "detail": ...} (or the URL string itself)


class ChatMessage(Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


def chat_message_dicts(messages: list[ChatMessage] | None, images: list[ImageRef] | None = None) -> list[dict]:
    """OpenAI chat messages as the dicts a chat template takes (text parts joined). With `images` (a vision language
    model), every content is a list of parts as processor templates take them, an image_url part becomes
    {"type": "image"} and its image is appended to `images`."""
    if not messages:
        raise HttpError(400, "messages: required, a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        role = message.role.lower()
        if role not in CHAT_ROLES:
            raise HttpError(400, f"messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}, got {message.role!r}",
                            f"messages[{i}].role")
        content = message.content
        if content is None:
            if role != "assistant" or not message.tool_calls:
                field = f"messages[{i}].content"
                raise HttpError(400, f"{field}: required for a {role} message (only an assistant message with "
                                     "tool_calls may leave it out)", field)
            content = ""
        if images is not None:
            content = _content_parts(content, f"messages[{i}].content", images)
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                field = f"messages[{i}].content[{j}]"
                if part.type == "image_url":
                    raise HttpError(400, f"{field}: this model takes no images (not a vision language model)", field)
                if part.type != "text":
                    raise HttpError(400, f"{field}: only text parts are supported, got type {part.type!r}", field)
                if part.text is None:
                    raise HttpError(400, f"{field}.text: a text part needs a `text` string", f"{field}.text")
                texts.append(part.text)
            content = "\n".join(texts)
        entry = {"role": role, "content": content}
        for key in ("name", "tool_calls", "tool_call_id"):
            value = getattr(message, key)
            if value is not None:
                entry[key] = value
        out.append(entry)
    return out


def _content_parts(content: str | list[ContentPart], field: str, images: list[ImageRef]) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    parts = []
    for j, part in enumerate(content):
        where = f"{field}[{j}]"
        if part.type == "text":
            if part.text is None:
                raise HttpError(400, f"{where}.text: a text part needs a `text` string", f"{where}.text")
            parts.append({"type": "text", "text": part.text})
        elif part.type == "image_url":
            image = part.image_url
            url, detail = (image, "auto") if isinstance(image, str) else (
                (image.get("url"), image.get("detail") or "auto") if isinstance(image, dict) else (None, "auto"))
            if not isinstance(url, str) or not url:
                raise HttpError(400, f"{where}.image_url.url: required, a data URL, an http(s) URL or a file path",
                                f"{where}.image_url.url")
            images.append(ImageRef(url, f"{where}.image_url", detail))
            parts.append({"type": "image"})
        else:
            raise HttpError(400, f"{where}: only text and image_url parts are supported, got type {part.type!r}",
                            where)
    return parts


class ChatBody(_OpenAISampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] | None = None
    max_tokens: int | None = None  # None (and no max_completion_tokens): up to the context length
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    separate_reasoning: bool | None = None  # SGLang's: false keeps <think>...</think> in the content
    chat_template_kwargs: dict[str, Any] | None = None  # variables of the chat template (enable_thinking, ...)
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None


def decode_body(body: bytes, body_type: type):
    """JSON body -> Struct, or HttpError(400) naming the field at fault."""
    if not body.strip():
        raise HttpError(400, "the request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(body, type=body_type)
    except msgspec.ValidationError as err:
        message = str(err)
        _, _, path = message.partition(" - at `")
        is_key = path.startswith("key` in `")  # "... - at `key` in `$.sampling_params.logit_bias`"
        path = path.removeprefix("key` in `").rstrip("`").removeprefix("$").lstrip(".")
        param = path.removesuffix("[...]") or None
        if is_key:
            problem, _, _ = message.partition(" - at `")
            raise HttpError(400, f"invalid request: {param}: a key is not valid ({problem}); keys are token ids "
                                 "written as strings, e.g. {\"1234\": -100}", param) from None
        raise HttpError(400, f"invalid request: {message}", param) from None
    except msgspec.DecodeError as err:
        raise HttpError(400, f"the request body is not valid JSON: {err}") from None


class FieldNames:
    """How a field is called in the request at hand: "sampling_params.temperature" in the native
    API, "temperature" (and "max_tokens" for max_new_tokens) in OpenAI's."""

    def __init__(self, prefix: str = "", renames: dict[str, str] | None = None):
        self.prefix = prefix
        self.renames = renames or {}

    def __call__(self, name: str) -> str:
        return self.prefix + self.renames.get(name, name)


NATIVE_FIELDS = FieldNames("sampling_params.")


def _bad(field: str, message: str) -> HttpError:
    return HttpError(400, f"{field}: {message}", field)


def check_sampling(p: NativeSamplingParams, vocab_size: int, name: FieldNames) -> None:
    """Range checks that do not depend on the prompt (SGLang's ranges)."""
    for field in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
        if not math.isfinite(getattr(p, field)):
            raise _bad(name(field), "must be a finite number")
    if p.temperature < 0:
        raise _bad(name("temperature"), f"must be >= 0, got {p.temperature}")
    if not 0 < p.top_p <= 1:
        raise _bad(name("top_p"), f"must be in (0, 1], got {p.top_p}")
    if p.top_k != -1 and p.top_k < 1:
        raise _bad(name("top_k"), f"must be -1 (whole vocabulary) or >= 1, got {p.top_k}")
    if not 0 <= p.min_p <= 1:
        raise _bad(name("min_p"), f"must be in [0, 1], got {p.min_p}")
    for field in ("frequency_penalty", "presence_penalty"):
        if not -2 <= getattr(p, field) <= 2:
            raise _bad(name(field), f"must be in [-2, 2], got {getattr(p, field)}")
    if not 0 < p.repetition_penalty <= 2:
        raise _bad(name("repetition_penalty"), f"must be in (0, 2], got {p.repetition_penalty}")
    if p.max_new_tokens is not None and p.max_new_tokens < 0:
        raise _bad(name("max_new_tokens"), f"must be >= 0, got {p.max_new_tokens}")
    if p.min_new_tokens < 0:
        raise _bad(name("min_new_tokens"), f"must be >= 0, got {p.min_new_tokens}")
    if p.max_new_tokens is not None and p.min_new_tokens > p.max_new_tokens:
        raise _bad(name("min_new_tokens"), f"must not exceed max_new_tokens ({p.min_new_tokens} > {p.max_new_tokens})")
    if not 1 <= p.n <= MAX_N:
        raise _bad(name("n"), f"must be in [1, {MAX_N}], got {p.n}")
    if p.seed is not None and not 0 <= p.seed < 2**63:
        raise _bad(name("seed"), f"must be in [0, 2**63), got {p.seed}")
    stops = stop_list(p.stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(name("stop"), f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    for i, stop in enumerate(stops):
        if not stop:
            raise _bad(name("stop"), f"stop strings must not be empty (entry {i})")
    for i, token_id in enumerate(p.stop_token_ids or ()):
        if not 0 <= token_id < vocab_size:
            raise _bad(name("stop_token_ids"),
                       f"entry {i} ({token_id}) is not a token id (vocabulary size {vocab_size})")
    for token_id, bias in (p.logit_bias or {}).items():
        if not 0 <= token_id < vocab_size:
            raise _bad(name("logit_bias"), f"key {token_id} is not a token id (vocabulary size {vocab_size})")
        if not (math.isfinite(bias) and -100 <= bias <= 100):
            raise _bad(name("logit_bias"), f"bias for token {token_id} must be in [-100, 100], got {bias}")
    problem = stop_regex.check(stop_list(p.stop_regex))
    if problem:
        raise _bad(name("stop_regex"), problem)
    if p.stream_interval is not None and p.stream_interval < 1:
        raise _bad(name("stream_interval"), f"must be >= 1, got {p.stream_interval}")
    if p.sampling_seed is not None and not -2**63 <= p.sampling_seed < 2**63:
        raise _bad(name("sampling_seed"), f"must be a signed 64-bit integer, got {p.sampling_seed}")
    if p.beam_width is not None and p.beam_width != 1:
        raise _bad(name("beam_width"), f"beam search is not supported by this server (only 1), got {p.beam_width}")
    if not _watermark_off(p.watermark):
        raise _bad(name("watermark"), "watermarking is not enabled on this server (SGLang needs --enable-watermark "
                                      "for it; this server does not implement it)")


def _watermark_off(watermark) -> bool:
    """SGLang's watermark request: null, false, or an object whose `enabled` is false."""
    return watermark is None or watermark is False or (isinstance(watermark, dict) and not watermark.get("enabled"))


def check_prompt(input_ids: list[int], vocab_size: int, context_length: int, field: str) -> None:
    if not input_ids:
        raise HttpError(400, f"{field}: the prompt is empty", field)
    low, high = min(input_ids), max(input_ids)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise HttpError(400, f"{field}: token id {bad} at position {input_ids.index(bad)} is not in the vocabulary "
                             f"(0..{vocab_size - 1})", field)
    if len(input_ids) >= context_length:
        raise HttpError(400, f"{field}: the prompt has {len(input_ids)} tokens, which leaves no room to generate "
                             f"within the model's context length of {context_length} tokens", field)


def to_sampling_params(p: NativeSamplingParams, prompt_len: int, context_length: int, name: FieldNames,
                       default_max_new_tokens: int | None, seed_offset: int = 0,
                       grammar: GrammarSpec | None = None, custom_logit_processor: str | None = None) -> SamplingParams:
    """The engine's SamplingParams for one prompt (n is fanned out by the caller, so n=1 here).
    An explicit max_new_tokens that does not fit the context is an error (as in SGLang); the
    default (None: all the room left) is clamped to it."""
    room = context_length - prompt_len
    if p.max_new_tokens is None:
        max_new_tokens = room if default_max_new_tokens is None else min(default_max_new_tokens, room)
    else:
        max_new_tokens = p.max_new_tokens
        if prompt_len + max_new_tokens > context_length:
            raise _bad(name("max_new_tokens"),
                       f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
                       f"context length of {context_length} tokens; reduce the prompt or max_new_tokens")
    if p.min_new_tokens > max_new_tokens:
        raise _bad(name("min_new_tokens"), f"must not exceed max_new_tokens ({p.min_new_tokens} > {max_new_tokens})")
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        min_new_tokens=p.min_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        repetition_penalty=p.repetition_penalty,
        stop=stop_list(p.stop),
        stop_token_ids=list(p.stop_token_ids or ()),
        ignore_eos=p.ignore_eos,
        skip_special_tokens=p.skip_special_tokens,
        spaces_between_special_tokens=p.spaces_between_special_tokens,
        no_stop_trim=p.no_stop_trim,
        n=1,
        seed=None if p.seed is None else (p.seed + seed_offset) % 2**63,
        logit_bias=dict(p.logit_bias or {}),
        stop_regex=stop_list(p.stop_regex),
        stream_interval=p.stream_interval,
        grammar=grammar,
        custom_logit_processor=custom_logit_processor,
        custom_params=p.custom_params,
    )


def check_custom_logit_processor(value: Any, enabled: bool, field: str = "custom_logit_processor") -> str | None:
    """A request's custom_logit_processor, checked for SGLang's wire form (JSON {"callable": hex}) without
    loading it: only a worker loads it (runtime/worker/custom_logit_processor.py). Refused unless the server runs
    with --enable-custom-logit-processor."""
    if value is None:
        return None
    if not enabled:
        raise HttpError(400, CUSTOM_LOGIT_PROCESSOR_REFUSED.replace("custom_logit_processor", field, 1), field)
    try:
        payload = msgspec.json.decode(value) if isinstance(value, str) else None
        bytes.fromhex(payload["callable"])
    except (msgspec.DecodeError, TypeError, KeyError, ValueError):
        raise _bad(field, 'expected CustomLogitProcessor.to_str(): a JSON string {"callable": "<hex>"}') from None
    return value


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def openai_sampling(body: _OpenAISampling, max_tokens: int | None, temperature_default: float) -> NativeSamplingParams:
    """The OpenAI fields of a request, as native sampling params (validated by check_sampling)."""

    def given(value, default):
        return default if value is None else value

    return NativeSamplingParams(
        max_new_tokens=max_tokens,
        min_new_tokens=given(body.min_tokens, 0),
        temperature=given(body.temperature, temperature_default),
        top_p=given(body.top_p, 1.0),
        top_k=given(body.top_k, -1),
        min_p=given(body.min_p, 0.0),
        frequency_penalty=given(body.frequency_penalty, 0.0),
        presence_penalty=given(body.presence_penalty, 0.0),
        repetition_penalty=given(body.repetition_penalty, 1.0),
        stop=body.stop,
        stop_token_ids=body.stop_token_ids,
        ignore_eos=given(body.ignore_eos, False),
        skip_special_tokens=given(body.skip_special_tokens, True),
        spaces_between_special_tokens=given(body.spaces_between_special_tokens, True),
        no_stop_trim=given(body.no_stop_trim, False),
        n=given(body.n, 1),
        seed=body.seed,
        logit_bias=body.logit_bias,
        custom_params=body.custom_params,
        json_schema=body.json_schema,
        regex=body.regex,
        ebnf=body.ebnf,
        stop_regex=body.stop_regex,
    )


OPENAI_FIELDS = FieldNames("", {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"})
CHAT_FIELDS_MAX_COMPLETION = FieldNames("", {"max_new_tokens": "max_completion_tokens", "min_new_tokens": "min_tokens"})


def per_prompt(value, count: int, field: str, is_batch: bool) -> list:
    """A per-request field of a (possibly batched) native request, as one value per prompt."""
    if isinstance(value, list):
        if not is_batch:
            raise HttpError(400, f"{field}: a list is only accepted for a batch (text or input_ids given as a list)",
                            field)
        if len(value) != count:
            raise HttpError(400, f"{field}: has {len(value)} entries for a batch of {count} prompts", field)
        return value
    return [value] * count



def request_deadline(timeout: float | None, server_timeout: float | None, arrival: float) -> float | None:
    """The request's deadline (time.monotonic()), from its own `timeout` field and --request-timeout: the
    shorter of the two (a client may not extend the server's limit). None: no deadline."""
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise HttpError(400, f"timeout: must be a positive number of seconds, got {timeout}", "timeout")
    limits = [t for t in (timeout, server_timeout) if t is not None]
    return arrival + min(limits) if limits else None


def check_sequence_count(count: int, limit: int, what: str) -> None:
    """One request may not fan out into more than --max-seqs-per-request sequences (prompts x n)."""
    if count > limit:
        raise HttpError(400, f"{what}: the request asks for {count} sequences; the server allows at most {limit} "
                             "per request (--max-seqs-per-request)", what.partition(" ")[0])
