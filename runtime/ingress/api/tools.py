"""Tool calling for /v1/chat/completions: `tools`, `tool_choice`, `parallel_tool_calls` checked and turned
into what the request needs: the tools the chat template sees, the grammar that forces calls, and the
parser that reads calls out of the reply.

- `none`: the template gets no tools and nothing is parsed;
- `auto` (the default when tools are given): the reply is parsed by the --tool-call-parser family;
  without a parser it is plain content;
- `required` / `{"type": "function", "function": {"name": ...}}`: a grammar forces the calls, written in
  the family's own format when it has one (runtime/constrained/tool_parsers), else as JSON: an array of
  `{"name", "parameters"}` for required, the bare arguments object for a named function;
- `parallel_tool_calls: false`: at most one call (forced by the grammar; under auto, the first is kept).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from httpd import HttpError
from runtime.constrained.grammars import grammar_spec, json_tool_calls_schema, tool_calls_format
from runtime.constrained.tool_parsers import PARSERS, JsonArrayParser, NamedArgumentsParser, ToolParser
from runtime.ingress.api.structured import check_grammar
from runtime.messages import GrammarSpec

_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass
class ChatTools:
    choice: str = "none"  # none | auto | required | named
    tools: list[dict] = field(default_factory=list)  # the request's function tools, checked
    parallel: bool = True
    parser: ToolParser | None = None  # reads calls out of the reply; None: no parsing
    grammar: GrammarSpec | None = None  # forces the calls (required / named)

    @property
    def template_tools(self) -> list[dict] | None:
        return self.tools if self.choice != "none" and self.tools else None

    @property
    def keeps_special_tokens(self) -> bool:
        return self.parser is not None and self.parser.keeps_special_tokens


def _bad(field_name: str, message: str) -> HttpError:
    return HttpError(400, f"{field_name}: {message}", field_name)


def check_tools(tools: Any) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _bad("tools", "expected a list of tools")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _bad(f"{where}.type", "only function tools are supported: {\"type\": \"function\", \"function\": "
                                        "{\"name\", \"description\", \"parameters\"}}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _bad(f"{where}.function", "expected an object with name, description, parameters")
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise _bad(f"{where}.function.name", "must be 1 to 64 letters, digits, '_', '.' or '-'")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _bad(f"{where}.function.parameters", "expected a JSON schema object")
        out.append({"type": "function", "function": function})
    names = [t["function"]["name"] for t in out]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise _bad(f"tools[{i}].function.name", f"{name!r} is defined twice")
    return out


def chat_tools(frontend, tools: Any, tool_choice: Any, parallel_tool_calls: bool | None) -> ChatTools:
    checked = check_tools(tools)
    choice, function = _tool_choice(tool_choice, checked)
    out = ChatTools(choice=choice, tools=checked, parallel=parallel_tool_calls is not False)
    if choice == "none" or not checked:
        return out
    family = PARSERS[frontend.args.tool_call_parser]() if frontend.args.tool_call_parser else None
    if choice == "auto":
        out.parser = family
        return out
    forced = checked if choice == "required" else [t for t in checked if t["function"]["name"] == function]
    single = choice == "named" or not out.parallel
    if family is not None and family.template is not None:
        out.parser = family
        out.grammar = tool_calls_format(forced, family.template, at_least_one=True, single=single)
    elif choice == "required":
        out.parser = JsonArrayParser()
        out.grammar = json_tool_calls_schema(forced, single)
    else:
        out.parser = NamedArgumentsParser(function)
        parameters = forced[0]["function"].get("parameters") or {"type": "object"}
        out.grammar = grammar_spec("json_schema", json.dumps(parameters, ensure_ascii=False), "tools")
    out.grammar = check_grammar(frontend, out.grammar)
    return out


def _tool_choice(tool_choice: Any, tools: list[dict]) -> tuple[str, str | None]:
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not tools:
            raise _bad("tool_choice", "'required' needs at least one tool in `tools`")
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        known = [t["function"]["name"] for t in tools]
        if name not in known:
            raise _bad("tool_choice.function.name", f"{name!r} is not one of the tools ({', '.join(known) or 'none'})")
        return "named", name
    raise _bad("tool_choice", "must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                              "{\"name\": ...}}")


def template_tool_calls(tool_calls: Any, where: str) -> list[dict]:
    """An assistant message's `tool_calls` as chat templates expect them: arguments as an object (OpenAI
    sends a JSON string; templates render `arguments | tojson`)."""
    if not isinstance(tool_calls, list):
        raise _bad(where, "expected a list of tool calls")
    out = []
    for j, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad(f"{where}[{j}].function", "expected {\"name\": ..., \"arguments\": ...}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as err:
                raise _bad(f"{where}[{j}].function.arguments", f"not valid JSON: {err}") from None
        out.append({**call, "type": call.get("type", "function"),
                    "function": {"name": function["name"], "arguments": arguments}})
    return out
