"""What a child process needs to know to become an actor: plain msgspec Structs, as JSON.

The launcher describes each actor with an `ActorSpec` (class by import path, config as raw JSON,
the channels it reads and writes). The supervisor wraps it in a `BootSpec` (control rings, parent
pid, sys.path), writes that to a 0600 shared-memory segment and passes only the segment's name to
`python -m actors.boot`: configs hold secrets (an API key), and argv and the environment are
readable by every local user (`ps`, /proc).
"""

from __future__ import annotations

import importlib
from typing import Any

import msgspec


class RingSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One shared-memory ring. The supervisor creates it (and owns the name); actors attach."""

    segment: str  # /dev/shm name, under the run prefix
    capacity: int  # bytes
    n_readers: int = 0  # 0: a Ring (one producer, one consumer); >= 1: a BroadcastRing


class ChannelSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One end of a channel: a ring plus the message union it carries."""

    name: str  # logical name, e.g. "ingress_to_scheduler"; errors and the mailbox use it
    ring: RingSpec
    message_type: str  # import path of the union, e.g. "runtime.messages:IngressToScheduler"
    reader_index: int = 0  # which reader cursor of a BroadcastRing this end reads with


class ActorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str  # unique per run: "scheduler", "worker0", ...
    actor_class: str  # import path, e.g. "runtime.scheduler:SchedulerActor"
    config: msgspec.Raw = msgspec.Raw(b"{}")  # JSON, decoded with the class's `config_type`
    inbound: list[ChannelSpec] = []
    outbound: list[ChannelSpec] = []
    log_level: str = "info"
    cpus: list[int] = []  # cores to pin the process to at boot (runtime.affinity plans them); [] = no pinning
    title: str = ""  # process title shown by ps/top (setproctitle); "" = "actors.boot <name>"
    # Modules this actor must never import (sys.modules[name] = None at boot): "torch" in a process whose
    # libraries would otherwise import it for nothing (transformers does), seconds and 200 MB each.
    blocked_imports: list[str] = []


class BootSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything `python -m actors.boot` receives (as JSON in the segment named by argv[1])."""

    actor: ActorSpec
    control_up: RingSpec  # child -> supervisor: Ready / Failed
    control_down: ChannelSpec  # supervisor -> child: Shutdown (joins the actor's mailbox)
    parent_pid: int  # the supervisor's pid; the child exits at once if its parent is not this one
    sys_path: list[str] = []  # the parent's sys.path, so the child imports what the parent could


def resolve(import_path: str) -> Any:
    """"package.module:attr" -> the object. A clear ValueError/ImportError names the path."""
    module_name, sep, attr = import_path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"import path {import_path!r} must look like 'package.module:Name'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r} (from {import_path!r})") from None
