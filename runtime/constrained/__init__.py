"""Structured output: grammar-constrained decoding, tool calls and reasoning.

Ingress side (no device): `grammars.py` turns request fields (native json_schema / regex / ebnf /
structural_tag, OpenAI response_format, forced tool choices, a reasoning block) into a
`runtime.messages.GrammarSpec` and validates it; `tool_parsers/` and `reasoning.py` read tool calls and
reasoning out of the generated text, whole or streamed.
Worker side: `compile_cache.py` compiles grammars in background threads with a cache keyed by the
grammar; `row_matchers.py` keeps one matcher per request-table row and fills the token bitmask the
sampler applies. `backend.py` is the one place that calls the xgrammar compiler.
The scheduler imports none of this (xgrammar imports torch): it only sees GrammarSpec keys.
"""
