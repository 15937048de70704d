"""Which grammars the workers have compiled: a constrained request is admitted only once its grammar is
ready, so no step ever waits for a compile (runtime/constrained/compile_cache.py compiles in the
background on the workers).

A queued request whose grammar is neither ready nor being compiled puts it in the outbox; the actor
sends the outbox as one CompileGrammars before planning. Rank 0 answers GrammarReady per key. The ready
set is an LRU half the size of the workers' cache, so a grammar the scheduler thinks ready is almost
always still compiled there (if not, the worker compiles it when the row arrives: slower, still right).
"""

from __future__ import annotations

import collections

from runtime.messages import GrammarReady, GrammarSpec

READY_CAPACITY = 512


class GrammarGate:
    def __init__(self, capacity: int = READY_CAPACITY):
        self.capacity = capacity
        self._ready: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._compiling: set[str] = set()
        self._outbox: list[GrammarSpec] = []
        self.compiles = 0  # grammars sent to the workers
        self.cache_hits = 0  # requests whose grammar was ready when they arrived

    def on_request(self, spec: GrammarSpec) -> None:
        if spec.key in self._ready:
            self.cache_hits += 1
        self.admissible(spec)

    def admissible(self, spec: GrammarSpec | None) -> bool:
        """Whether a request with this grammar may be admitted now; asks for a compile if nobody has."""
        if spec is None:
            return True
        if spec.key in self._ready:
            self._ready.move_to_end(spec.key)
            return True
        if spec.key not in self._compiling:
            self._compiling.add(spec.key)
            self._outbox.append(spec)
            self.compiles += 1
        return False

    def on_ready(self, msg: GrammarReady) -> None:
        self._compiling.discard(msg.key)
        if msg.error is None:
            self._ready[msg.key] = None
            self._ready.move_to_end(msg.key)
            while len(self._ready) > self.capacity:
                self._ready.popitem(last=False)

    def take_outbox(self) -> list[GrammarSpec]:
        specs, self._outbox = self._outbox, []
        return specs

    @property
    def compiling(self) -> int:
        return len(self._compiling)
