"""What spans ranks and nodes: the dp x tp x node layout (layout.py, no torch) and the node relay actor, which
carries the scheduler's plans to the workers of other nodes. The actor class is imported on first use, so that
importing the layout (the launcher does) pulls in no torch."""


def __getattr__(name: str):
    if name == "RelayActor":
        from runtime.distributed.actor import RelayActor

        return RelayActor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
