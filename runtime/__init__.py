"""An LLM serving engine. `runtime.Engine` is imported on first use, so `import runtime` stays cheap
(actor processes import submodules of this package and must not pay for the Engine's imports)."""

__all__ = ["Engine"]


def __getattr__(name: str):
    if name == "Engine":
        from runtime.engine import Engine

        return Engine
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
