"""Chat templates: the tokenizer's own, a Jinja file (`--chat-template path.jinja`), or a small set of
named built-ins (`--chat-template chatml`). The value is resolved once at start-up and stored on the
tokenizer (`tokenizer.chat_template`), so every process that loads the tokenizer renders the same way.

The templates below are written for this project from the published prompt formats. They do not need
to handle `continue_final_message`: transformers renders the conversation and cuts the text right
after the final message's content."""

from __future__ import annotations

import os

import jinja2

# Literal text sits in {{ '...' }} expressions so the whitespace control of the tags ({%- -%})
# never eats the newlines of the format.
_CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# ChatML with the default system prompt Qwen2 models were tuned with.
_QWEN2 = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif -%}" + _CHATML
)

_LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)

# [INST] turns; a leading system message is folded into the first user turn.
_LLAMA2 = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('llama-2 conversations must alternate user and assistant turns, starting with user') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)

# LLaVA's conversation formats (SGLang's names): a message's content may be a list of parts, whose images render as
# the "<image>" placeholder (each on its own line, before the message's text, as LLaVA was trained).
_LLAVA_CONTENT = (
    "{%- macro content(message) -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] in ('image', 'image_url') -%}{{ '<image>\n' }}{%- endfor -%}"
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\n') }}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

_CHATML_LLAVA = _LLAVA_CONTENT + (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content(message) + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

_LLAVA_LLAMA_3 = _LLAVA_CONTENT + (
    "{{- bos_token -}}"
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. You are "
    "able to understand the visual content that the user provides, and assist the user with a variety of tasks using "
    "natural language.<|eot_id|>' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + content(message) | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)

BUILTIN_CHAT_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "qwen2": _QWEN2,
    "llama-3": _LLAMA3,
    "llama-2": _LLAMA2,
    "chatml-llava": _CHATML_LLAVA,
    "llava_llama_3": _LLAVA_LLAMA_3,
}


class ChatTemplateError(ValueError):
    pass


def load_chat_template(value: str) -> str:
    """Resolve `--chat-template`: a built-in name or a path to a Jinja file. The template is parsed
    here so a syntax error stops the server at start-up instead of failing every chat request."""
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value]
    if not os.path.isfile(value):
        names = ", ".join(BUILTIN_CHAT_TEMPLATES)
        raise ChatTemplateError(f"--chat-template: {value!r} is neither a file nor a built-in template ({names})")
    with open(value, encoding="utf-8") as f:
        template = f.read()
    if not template.strip():
        raise ChatTemplateError(f"--chat-template: {value} is empty")
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"--chat-template: {value} line {err.lineno}: {err.message}") from None
    return template
