"""Grammar compilation on a worker: in background threads, never in the step loop, with a cache keyed by
the grammar (GrammarSpec.key).

The scheduler sends `CompileGrammars` for the grammars of queued requests it does not know to be ready
and admits a request only once rank 0 has answered `GrammarReady` for its key, so a step never waits for
a compile. Every asked key gets exactly one answer (at once when it is cached already). A row whose
grammar was evicted in between compiles it on the spot (`get`): slower, still correct.

The xgrammar compiler needs the vocabulary: the tokenizer is loaded and turned into xgrammar's
TokenizerInfo by the first compile (in the background), so a server that never sees a grammar never
pays for it (nor for importing xgrammar). The model's EOS ids are the grammars' stop tokens.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from runtime.messages import GrammarReady, GrammarSpec

if TYPE_CHECKING:
    import xgrammar as xgr

log = logging.getLogger(__name__)

CACHE_SIZE = 1024  # compiled grammars kept (the scheduler remembers half as many as ready)


class GrammarCompileCache:
    def __init__(self, load_tokenizer: Callable[[], object], vocab_size: int, stop_token_ids: list[int],
                 capacity: int = CACHE_SIZE, threads: int = 2):
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.capacity = capacity
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="grammar-compile")
        self._compiler: concurrent.futures.Future | None = None
        self._compiled: collections.OrderedDict[str, concurrent.futures.Future] = collections.OrderedDict()
        self._unanswered: dict[str, concurrent.futures.Future] = {}  # asked by the scheduler, not answered yet
        self._lock = threading.Lock()  # the cache is read by the step loop and filled by callbacks
        self.compiles = 0
        self.hits = 0

    # -------------------------------------------------------------------------------- scheduler side

    def submit(self, specs: Iterable[GrammarSpec]) -> None:
        """Start compiling `specs` (cached ones are answered by the next `replies()`)."""
        for spec in specs:
            self._unanswered[spec.key] = self._future(spec)

    @property
    def busy(self) -> bool:
        """Some asked grammar is not answered yet: the worker should poll `replies()` soon."""
        return bool(self._unanswered)

    def replies(self) -> list[GrammarReady]:
        """Answers for the asked grammars whose compile has ended since the last call."""
        out = []
        for key, future in list(self._unanswered.items()):
            if future.done():
                del self._unanswered[key]
                error, message = future.exception(), None
                if error is not None:
                    from runtime.constrained.backend import compiler_message  # loaded by the compile that failed

                    message = compiler_message(error)
                out.append(GrammarReady(key=key, error=message))
        return out

    # -------------------------------------------------------------------------------- step side

    def get(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar (blocks only when it is still compiling or was evicted)."""
        future = self._future(spec)
        if not future.done():
            log.info("grammar %s was not compiled ahead of its request; the step waits for it", spec.key)
        return future.result()

    def _future(self, spec: GrammarSpec) -> concurrent.futures.Future:
        with self._lock:
            future = self._compiled.get(spec.key)
            if future is not None:
                self._compiled.move_to_end(spec.key)
                self.hits += 1
                return future
            if self._compiler is None:
                self._compiler = self._pool.submit(self._make_compiler)
            future = self._pool.submit(self._compile, spec)
            self._compiled[spec.key] = future
            self.compiles += 1
            self._evict()
            return future

    def _evict(self) -> None:
        while len(self._compiled) > self.capacity:
            key, future = next(iter(self._compiled.items()))
            if not future.done():
                return  # oldest still compiling: evict later
            del self._compiled[key]

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        from runtime.constrained import backend

        compiler = self._compiler.result()
        start = time.perf_counter()
        compiled = backend.compile_grammar(compiler, spec)
        log.debug("compiled %s grammar %s in %.1f ms", spec.kind, spec.key, (time.perf_counter() - start) * 1e3)
        return compiled

    def _make_compiler(self) -> xgr.GrammarCompiler:
        import xgrammar as xgr

        start = time.perf_counter()
        tokenizer = self._load_tokenizer()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                  stop_token_ids=self.stop_token_ids)
        log.info("grammar compiler ready in %.2f s (vocabulary of %d tokens)", time.perf_counter() - start,
                 self.vocab_size)
        threads = max(1, min(8, (os.cpu_count() or 2) // 2))  # one compile's mask precomputation, in parallel
        return xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
