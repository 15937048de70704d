"""The detokenizer actor's package. The actor class is imported on first use, so that importing a module of this package
(and the launcher naming \"runtime.detokenizer:DetokenizerActor\") does not pull in the actor's own dependencies."""


def __getattr__(name: str):
    if name == "DetokenizerActor":
        from runtime.detokenizer.actor import DetokenizerActor

        return DetokenizerActor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
