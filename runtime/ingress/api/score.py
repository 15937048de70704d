"""POST /v1/score, SGLang's scoring API: for each item, the probabilities of the label tokens as the
next token after query + item (item + query with item_first).

    {"query": "Is Paris in France? Answer:", "items": [" yes", " no"] | "text" | [[ids], ...],
     "label_token_ids": [9907, 2152] | [[...], [...]] (one list per item), "apply_softmax": false,
     "temperature": 1.0, "return_token_logprobs": false, "item_first": false}
    -> {"scores": [[p_label0, p_label1], ...], "token_logprobs": [[...], ...] (asked for), "model",
        "usage", "object": "scoring"}

Scores are exp(logprob) of each label (raw logits, full vocabulary), or with apply_softmax the
softmax of logprob / temperature over the item's labels (a temperature other than 1 needs it, as in
SGLang). Texts are joined before tokenizing; token ids are concatenated. Each item is one request
of max_new_tokens 1 whose first token's token_ids_logprob are the labels: it costs the prefill (the
query is shared through the prefix cache) and no extra forward pass."""

from __future__ import annotations

import math
import time
import uuid
from http import HTTPStatus

from msgspec import Struct

from httpd import HttpError, Request, Response, json_response
from httpd.response import error_type
from runtime.ingress.api.generation import Generation
from runtime.ingress.api.metrics import Metrics
from runtime.ingress.api.protocol import check_prompt, decode_body
from runtime.ingress.api.sequence import Job, Sequence
from runtime.ingress.errors import RequestError
from runtime.ingress.frontend import Frontend
from runtime.messages import LogprobOptions, SamplingParams

MAX_ITEMS = 1024


class ScoreBody(Struct):
    query: str | list[int] | None = None
    items: str | list[str | list[int]] | None = None
    label_token_ids: list[int | list[int]] | None = None
    apply_softmax: bool = False
    temperature: float = 1.0
    return_token_logprobs: bool = False
    item_first: bool = False
    model: str | None = None


class ScoreApi:
    def __init__(self, frontend: Frontend, metrics: Metrics | None):
        self.frontend = frontend
        self.metrics = metrics

    async def score(self, request: Request) -> Response:
        try:
            return await self._score(request)
        except HttpError as err:
            return _score_error(err)

    async def _score(self, request: Request) -> Response:
        arrival = time.perf_counter()
        body: ScoreBody = decode_body(request.body, ScoreBody)
        info = self.frontend.model_info
        if not (math.isfinite(body.temperature) and body.temperature > 0):
            raise HttpError(400, f"temperature: must be a finite number > 0, got {body.temperature}", "temperature")
        if body.temperature != 1.0 and not body.apply_softmax:
            raise HttpError(400, "temperature: a temperature other than 1 needs apply_softmax", "temperature")
        prompts = self._prompts(body)
        labels = self._labels(body.label_token_ids, len(prompts), info.vocab_size)
        sequences = []
        request_id = f"score-{uuid.uuid4().hex}"
        for i, (input_ids, label_ids) in enumerate(zip(prompts, labels)):
            field = "items" if len(prompts) == 1 else f"items[{i}]"
            check_prompt(input_ids, info.vocab_size, info.context_length, field)
            job = Job(f"{request_id}-{i}", input_ids, SamplingParams(max_new_tokens=1, temperature=0.0),
                      LogprobOptions(return_logprob=True, token_ids_logprob=label_ids))
            sequences.append(Sequence(job, arrival))
        try:
            await Generation(self.frontend, sequences, self.metrics).run_to_end()
        except RequestError as err:
            raise HttpError(err.status, err.message) from None
        scores, token_logprobs = [], []
        for sequence in sequences:
            if sequence.finish is None or sequence.finish.type == "abort" or not sequence.logprobs.ids_logprobs:
                message = sequence.finish.message if sequence.finish is not None else None
                raise HttpError(500, f"the scoring request was aborted by the engine: {message or 'no reason given'}")
            logprobs = sequence.logprobs.ids_logprobs[0]
            token_logprobs.append(logprobs)
            scores.append(_softmax(logprobs, body.temperature) if body.apply_softmax
                          else [math.exp(lp) for lp in logprobs])
        prompt_tokens = sum(len(s.job.input_ids) for s in sequences)
        out = {"scores": scores, "model": self.frontend.served_model_name, "object": "scoring",
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}}
        if body.return_token_logprobs:
            out["token_logprobs"] = token_logprobs
        return json_response(out)

    def _prompts(self, body: ScoreBody) -> list[list[int]]:
        if body.query is None or body.items is None:
            raise HttpError(400, "query and items are required", "query" if body.query is None else "items")
        items = [body.items] if isinstance(body.items, str) else body.items
        if not items:
            raise HttpError(400, "items: the list is empty", "items")
        if len(items) > MAX_ITEMS:
            raise HttpError(400, f"items: at most {MAX_ITEMS} items per request, got {len(items)}", "items")
        if isinstance(body.query, str):
            if not all(isinstance(item, str) for item in items):
                raise HttpError(400, "items: with a text query the items must be texts", "items")
            texts = [item + body.query if body.item_first else body.query + item for item in items]
            try:
                return [self.frontend.encode(text) for text in texts]
            except RequestError as err:
                raise HttpError(err.status, err.message, "query") from None
        if not all(isinstance(item, list) for item in items):
            raise HttpError(400, "items: with a token-id query the items must be token-id lists", "items")
        return [item + body.query if body.item_first else body.query + item for item in items]

    @staticmethod
    def _labels(label_token_ids, count: int, vocab_size: int) -> list[list[int]]:
        if not label_token_ids:
            raise HttpError(400, "label_token_ids: required, the token ids to score", "label_token_ids")
        if all(isinstance(x, int) for x in label_token_ids):
            per_item = [list(label_token_ids)] * count
        elif all(isinstance(x, list) and x for x in label_token_ids) and len(label_token_ids) == count:
            per_item = label_token_ids
        else:
            raise HttpError(400, f"label_token_ids: a list of token ids, or {count} non-empty lists (one per item)",
                            "label_token_ids")
        for ids in per_item:
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise HttpError(400, f"label_token_ids: Token ID {bad} is out of vocabulary (vocabulary size "
                                     f"{vocab_size})", "label_token_ids")
        return per_item


def _softmax(logprobs: list[float], temperature: float) -> list[float]:
    scaled = [lp / temperature for lp in logprobs]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    total = sum(weights)
    return [w / total for w in weights]


def _score_error(err: HttpError) -> Response:
    """OpenAI's error shape, and beside it SGLang's flat one for this SGLang endpoint (its clients read the
    top-level `type`, e.g. "BadRequestError", and `message`)."""
    phrase = HTTPStatus(err.status).phrase.replace(" ", "") if err.status in HTTPStatus._value2member_map_ else ""
    error = {"message": err.message, "type": error_type(err.status), "param": err.param, "code": err.status}
    response = json_response({"error": error, "object": "error", "message": err.message, "type": f"{phrase}Error",
                              "param": err.param, "code": err.status}, err.status)
    response.headers = err.headers
    return response
