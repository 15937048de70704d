"""The scheduler actor's package. The actor class is imported on first use, so that importing a module of this package
(and the launcher naming \"runtime.scheduler:SchedulerActor\") does not pull in the actor's own dependencies."""


def __getattr__(name: str):
    if name == "SchedulerActor":
        from runtime.scheduler.actor import SchedulerActor

        return SchedulerActor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
