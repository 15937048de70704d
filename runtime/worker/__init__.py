"""The worker actor's package. The actor class is imported on first use, so that importing a module of this package
(and the launcher naming \"runtime.worker:WorkerActor\") does not pull in the actor's own dependencies."""


def __getattr__(name: str):
    if name == "WorkerActor":
        from runtime.worker.actor import WorkerActor

        return WorkerActor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
