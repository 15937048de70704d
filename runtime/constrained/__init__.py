"""Structured output: grammar-constrained decoding, tool calls and reasoning.

Ingress side (plain Python: the ingress runs without torch, which xgrammar imports): `grammars.py` turns
request fields (native json_schema / regex / ebnf / structural_tag, OpenAI response_format, forced tool
choices, a reasoning block) into a `runtime.messages.GrammarSpec`; `tool_parsers/`, `reasoning.py` and
`chat_output.py` read tool calls and reasoning out of the generated text, whole or streamed.
Worker side: `backend.py`, the one place that calls the xgrammar compiler (a grammar it refuses refuses the
request with a 400 naming the field); `compile_cache.py` compiles in background threads with a cache keyed
by the grammar; `row_matchers.py` keeps one matcher per request-table row and fills the token bitmask the
sampler applies. The scheduler only sees GrammarSpec keys (runtime/scheduler/grammar_gate.py).
"""
