"""The routes of the server, and the server itself, for one Frontend.

The ingress actor does:

    server = create_server(frontend, config, batches)  # limits and --api-key from frontend.args unless config
    await server.start(frontend.args.host, frontend.args.port)
    ...
    await server.close(grace_s)

`batches` is the BatchRunner behind /v1/files and /v1/batches (the durable store's), `responses` the
store of /v1/responses; without them those routes do not exist (the API tests' fake frontends).
"""

from __future__ import annotations

from httpd import HttpServer, Router, ServerConfig
from runtime.ingress.api.anthropic import AnthropicApi
from runtime.ingress.api.batch_runner import BatchRunner
from runtime.ingress.api.batches import BatchesApi
from runtime.ingress.api.embeddings import EmbeddingsApi
from runtime.ingress.api.files import FilesApi
from runtime.ingress.api.metrics import Metrics
from runtime.ingress.api.native import NativeApi
from runtime.ingress.api.openai import OpenAIApi
from runtime.ingress.api.responses import ResponsesApi
from runtime.ingress.api.score import ScoreApi
from runtime.ingress.api.tokenize import TokenizeApi
from runtime.ingress.store.responses import ResponseStore


def build_router(frontend, metrics: Metrics | None, batches: BatchRunner | None = None,
                 responses: ResponseStore | None = None) -> Router:
    native = NativeApi(frontend, metrics)
    openai = OpenAIApi(frontend, metrics)
    embeddings = EmbeddingsApi(frontend)
    router = Router()
    router.add("POST", "/generate", native.generate)
    router.add("POST", "/encode", embeddings.encode)
    router.add("GET", "/health", native.health)
    router.add("GET", "/health_generate", native.health_generate)
    # SGLang renamed these (0.5.10); clients of either name get the same answer.
    for path in ("/model_info", "/get_model_info"):
        router.add("GET", path, native.get_model_info)
    for path in ("/server_info", "/get_server_info"):
        router.add("GET", path, native.get_server_info)
    router.add(["GET", "POST"], "/flush_cache", native.flush_cache)
    router.add("POST", "/abort_request", native.abort_request)
    tokenize = TokenizeApi(frontend)
    for prefix in ("", "/v1"):
        router.add("POST", f"{prefix}/tokenize", tokenize.tokenize)
        router.add("POST", f"{prefix}/detokenize", tokenize.detokenize)
    if metrics is not None:
        router.add("GET", "/metrics", native.metrics_text)
    router.add("GET", "/v1/models", openai.models)
    router.add("GET", f"/v1/models/{frontend.served_model_name}", openai.model)
    router.add("POST", "/v1/completions", openai.completions)
    router.add("POST", "/v1/chat/completions", openai.chat_completions)
    router.add("POST", "/v1/score", ScoreApi(frontend, metrics).score)
    anthropic = AnthropicApi(frontend, metrics)
    router.add("POST", "/v1/messages", anthropic.messages)
    router.add("POST", "/v1/messages/count_tokens", anthropic.count_tokens)
    router.add("POST", "/v1/embeddings", embeddings.embeddings)
    if batches is not None:
        add_batch_routes(router, batches, frontend.args.file_max_bytes)
    if responses is not None:
        api = ResponsesApi(frontend, responses, metrics)
        router.add("POST", "/v1/responses", api.create)
        router.add("GET", "/v1/responses/{response_id}", api.retrieve)
        router.add("DELETE", "/v1/responses/{response_id}", api.delete)
    return router


def add_batch_routes(router: Router, batches: BatchRunner, file_max_bytes: int) -> None:
    files = FilesApi(batches.files, file_max_bytes)
    router.add("POST", "/v1/files", files.upload, accepts_form=True)
    router.add("GET", "/v1/files", files.list)
    router.add("GET", "/v1/files/{file_id}", files.retrieve)
    router.add("DELETE", "/v1/files/{file_id}", files.delete)
    router.add("GET", "/v1/files/{file_id}/content", files.content)
    api = BatchesApi(batches)
    router.add("POST", "/v1/batches", api.create)
    router.add("GET", "/v1/batches", api.list)
    router.add("GET", "/v1/batches/{batch_id}", api.retrieve)
    router.add("POST", "/v1/batches/{batch_id}/cancel", api.cancel)


def create_server(frontend, config: ServerConfig | None = None, batches: BatchRunner | None = None,
                  responses: ResponseStore | None = None) -> HttpServer:
    """The HTTP server for `frontend` (not listening yet: call .start(host, port)). Limits and the
    API key come from frontend.args unless `config` is given; /metrics exists with --enable-metrics."""
    args = frontend.args
    metrics = Metrics(frontend.served_model_name) if args.enable_metrics else None
    return HttpServer(build_router(frontend, metrics, batches, responses), config or ServerConfig.from_args(args))
