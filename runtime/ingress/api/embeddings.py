"""Embeddings: OpenAI's POST /v1/embeddings and SGLang's native POST /encode.

Every server answers them: an --is-embedding server pools as its checkpoint says (runtime/worker/pooling.py), a
generation server pools its final hidden state (last token, L2-normalised). Each input is one prefill-only request
(Frontend.embed); they run concurrently and share batches with generation requests."""

from __future__ import annotations

import asyncio
import base64
import os

import numpy as np
from msgspec import Struct

from httpd import HttpError, Request, Response, json_response
from runtime.ingress.api.protocol import decode_body
from runtime.ingress.errors import RequestError
from runtime.ingress.frontend import Frontend
from runtime.messages import EmbeddingResult

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
ENCODING_FORMATS = ("float", "base64")


class EmbeddingBody(Struct):
    """POST /v1/embeddings. Unknown fields are ignored, as OpenAI does."""

    input: str | list[str | int | list[int]] | None = None  # msgspec takes one list type; _inputs checks the mix
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None


class EncodeBody(Struct):
    """POST /encode (SGLang's EmbeddingReqInput): text or input_ids, one or a batch."""

    text: str | list[str] | None = None
    input_ids: list[int | list[int]] | None = None
    rid: str | list[str] | None = None


class EmbeddingsApi:
    def __init__(self, frontend: Frontend, priority: int = 0):
        """`priority`: of the requests this API sends (the batch runner's instance runs below interactive ones)."""
        self.frontend = frontend
        self.priority = priority
        self.pooling = frontend.model_info.pooling

    async def embeddings(self, request: Request) -> Response:
        body: EmbeddingBody = decode_body(request.body, EmbeddingBody)
        if body.encoding_format not in ENCODING_FORMATS:
            raise HttpError(400, f"encoding_format: must be one of {', '.join(ENCODING_FORMATS)}, got "
                                 f"{body.encoding_format!r}", "encoding_format")
        dimensions = self._dimensions(body.dimensions)
        prompts = await self._inputs(body.input, "input")
        results = await self._embed([f"embd-{os.urandom(12).hex()}-{i}" for i in range(len(prompts))], prompts)
        data = []
        for index, result in enumerate(results):
            vector = self._vector(result, dimensions)
            encoded = (base64.b64encode(vector.tobytes()).decode() if body.encoding_format == "base64"
                       else vector.tolist())
            data.append({"object": "embedding", "embedding": encoded, "index": index})
        tokens = sum(r.prompt_tokens for r in results)
        return json_response({"object": "list", "data": data, "model": self.frontend.served_model_name,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def encode(self, request: Request) -> Response:
        body: EncodeBody = decode_body(request.body, EncodeBody)
        if (body.text is None) == (body.input_ids is None):
            raise HttpError(400, "give exactly one of text or input_ids", "text")
        field = "text" if body.text is not None else "input_ids"
        value = body.text if body.text is not None else body.input_ids
        prompts = await self._inputs(value, field)
        is_batch = isinstance(body.text, list) or bool(body.input_ids and isinstance(body.input_ids[0], list))
        rids = body.rid if isinstance(body.rid, list) else [body.rid] if body.rid is not None else None
        if rids is not None and len(rids) != len(prompts):
            raise HttpError(400, f"rid: {len(rids)} ids for {len(prompts)} inputs", "rid")
        rids = rids or [os.urandom(16).hex() for _ in prompts]
        if len(set(rids)) != len(rids):
            raise HttpError(400, "rid: the ids of one request must be distinct", "rid")
        results = await self._embed(rids, prompts)
        outputs = [{"embedding": self._vector(r, None).tolist(),
                    "meta_info": {"id": r.rid, "finish_reason": {"type": "stop"}, "prompt_tokens": r.prompt_tokens,
                                  "cached_tokens": r.cached_tokens}} for r in results]
        return json_response(outputs if is_batch else outputs[0])

    # ------------------------------------------------------------------ shared

    async def _inputs(self, value, field: str) -> list[list[int]]:
        """A string, a list of strings, a list of token ids, or a list of token-id lists -> token-id lists."""
        if value is None:
            raise HttpError(400, f"{field}: required", field)
        if isinstance(value, str):
            items = [value]
        elif not value:
            raise HttpError(400, f"{field}: the list is empty", field)
        elif all(isinstance(x, int) for x in value):
            items = [value]
        elif all(isinstance(x, str) for x in value) or all(isinstance(x, list) for x in value):
            items = value
        else:
            raise HttpError(400, f"{field}: expected a string, a list of strings, a list of token ids or a list of "
                                 "token-id lists, not a mix", field)
        if len(items) > MAX_INPUTS:
            raise HttpError(400, f"{field}: at most {MAX_INPUTS} inputs per request, got {len(items)}", field)
        out = []
        for i, item in enumerate(items):
            name = field if len(items) == 1 and value is not items else f"{field}[{i}]"
            if isinstance(item, str):
                if not item:
                    raise HttpError(400, f"{name}: the input is empty", name)
                try:
                    item = await self.frontend.encode_async(item, name)
                except RequestError as err:
                    raise HttpError(err.status, err.message, name) from None
            if not item:
                raise HttpError(400, f"{name}: the input is empty", name)
            out.append(item)
        return out

    def _dimensions(self, dimensions: int | None) -> int | None:
        if dimensions is None:
            return None
        pooling = self.pooling
        if not pooling.matryoshka:
            raise HttpError(400, "dimensions: this model does not support shortened embeddings (its config.json "
                                 "declares no is_matryoshka / matryoshka_dimensions)", "dimensions")
        allowed = pooling.matryoshka_dimensions
        if allowed and dimensions not in allowed:
            raise HttpError(400, f"dimensions: must be one of {allowed}, got {dimensions}", "dimensions")
        if not 1 <= dimensions <= pooling.dimensions:
            raise HttpError(400, f"dimensions: must be in [1, {pooling.dimensions}], got {dimensions}", "dimensions")
        return dimensions

    def _vector(self, result: EmbeddingResult, dimensions: int | None) -> np.ndarray:
        vector = np.frombuffer(result.embedding, dtype="<f4")
        if dimensions is not None and dimensions < len(vector):
            vector = vector[:dimensions]
            if self.pooling.normalize:
                vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return vector.astype("<f4", copy=False)

    async def _embed(self, rids: list[str], prompts: list[list[int]]) -> list[EmbeddingResult]:
        """All inputs at once; the first failure cancels (aborts) the others."""
        tasks = [asyncio.ensure_future(self.frontend.embed(rid, ids, self.priority)) for rid, ids in zip(rids, prompts)]
        try:
            return await asyncio.gather(*tasks)
        except BaseException as err:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(err, RequestError):
                raise HttpError(err.status, err.message) from None
            raise
