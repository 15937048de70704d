"""The ingress actor's package. The actor class is imported on first use, so that importing a module of this package
(and the launcher naming \"runtime.ingress:IngressActor\") does not pull in the actor's own dependencies."""


def __getattr__(name: str):
    if name == "IngressActor":
        from runtime.ingress.actor import IngressActor

        return IngressActor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
