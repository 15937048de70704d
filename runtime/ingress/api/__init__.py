"""The HTTP APIs (native SGLang-format and OpenAI-compatible) on top of a Frontend.
Entry point: runtime.ingress.api.app.create_server(frontend)."""
