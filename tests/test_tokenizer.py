"""Tokenizer loading (GGUF with its cache, HF folders), chat templates and their errors."""

import os
import shutil

import pytest

from runtime.chat_templates import BUILTIN_CHAT_TEMPLATES, ChatTemplateError, load_chat_template
from runtime.default_model import default_model_path
from runtime.server_args import ServerArgs
from runtime.tokenizer import TokenizerLoadError, default_cache_root, gguf_cache_dir, load_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ServerArgs())


def render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_default_gguf_tokenizer(tokenizer):
    assert len(tokenizer) == 49152
    assert tokenizer.eos_token == "<|im_end|>"
    text = "Hello, 世界 😀"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_gguf_tokenizer_is_loaded_from_cache(tokenizer, tmp_path):
    # The module fixture converted the GGUF (or found it cached) under the default cache root.
    gguf = default_model_path()
    cached = gguf_cache_dir(gguf, default_cache_root())
    assert (cached / "tokenizer.json").is_file()
    # A copy of that cache entry, marked, under a fresh root: a load that hits the cache sees the mark.
    copy = gguf_cache_dir(gguf, tmp_path)
    shutil.copytree(cached, copy)
    (copy / "chat_template.jinja").write_text("CACHED {{ messages[0]['content'] }}")
    loaded = load_tokenizer(ServerArgs(), cache_root=tmp_path)
    assert render(loaded, CHAT[:1]) == "CACHED Be brief."
    assert loaded.encode("cache hit") == tokenizer.encode("cache hit")


def test_cache_key_follows_file_identity(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 10)
    first = gguf_cache_dir(str(gguf), tmp_path)
    os.utime(gguf, ns=(1, 1))
    assert gguf_cache_dir(str(gguf), tmp_path) != first
    other = tmp_path / "other.gguf"
    shutil.copy(gguf, other)
    os.utime(other, ns=(1, 1))
    assert gguf_cache_dir(str(other), tmp_path) != gguf_cache_dir(str(gguf), tmp_path)


def test_hf_folder_and_skip_init(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "hf")
    loaded = load_tokenizer(ServerArgs(model_path=str(tmp_path / "weights"), tokenizer_path=str(tmp_path / "hf")))
    assert loaded.encode("folder tokenizer") == tokenizer.encode("folder tokenizer")
    assert load_tokenizer(ServerArgs(skip_tokenizer_init=True)) is None


@pytest.mark.parametrize("args,flag", [
    (ServerArgs(model_path="/nonexistent/model"), "--model-path"),
    (ServerArgs(tokenizer_path="/nonexistent/tok"), "--tokenizer-path"),
])
def test_missing_path_names_the_flag(args, flag):
    with pytest.raises(TokenizerLoadError, match=flag):
        load_tokenizer(args)


def test_bad_sources_name_the_flag(tmp_path):
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(TokenizerLoadError, match="--tokenizer-path: .*not a .gguf"):
        load_tokenizer(ServerArgs(tokenizer_path=str(tmp_path / "notes.txt")))
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(TokenizerLoadError, match="several .gguf"):
        load_tokenizer(ServerArgs(model_path=str(tmp_path)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerLoadError, match="--model-path: cannot load"):
        load_tokenizer(ServerArgs(model_path=str(empty)))


def test_tokenizer_chat_template_from_gguf(tokenizer):
    text = render(tokenizer, CHAT[1:2], add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # SmolLM adds its default system prompt


def test_chat_template_from_file(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    tok = load_tokenizer(ServerArgs(chat_template=str(path)))
    assert render(tok, CHAT[:2]) == "[system]Be brief.[user]Hi"


def test_named_chat_templates(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)  # a private copy to mutate
    expected = {
        "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
        "llama-3": "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "llama-2": "<|im_start|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! <|im_end|>"
                   "<|im_start|>[INST] Bye [/INST]",
    }
    for name, text in expected.items():
        tokenizer.chat_template = load_chat_template(name)
        assert render(tokenizer, CHAT, add_generation_prompt=True) == text, name
    tokenizer.chat_template = load_chat_template("qwen2")
    assert render(tokenizer, CHAT[1:2]).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert render(tokenizer, CHAT[:2]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    tokenizer.chat_template = load_chat_template("llama-2")
    with pytest.raises(Exception, match="alternate"):
        render(tokenizer, [CHAT[1], CHAT[1]])
    assert set(BUILTIN_CHAT_TEMPLATES) == {"chatml", "qwen2", "llama-3", "llama-2", "chatml-llava", "llava_llama_3"}


def test_llava_chat_templates_place_images_before_the_text(tokenizer):
    """SGLang's chatml-llava and llava_llama_3: an image part is "<image>\n" ahead of its message's text."""
    chat = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image"}]}]
    tokenizer.chat_template = load_chat_template("chatml-llava")
    assert render(tokenizer, chat, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?"
        "<|im_end|>\n<|im_start|>assistant\n")
    tokenizer.chat_template = load_chat_template("llava_llama_3")
    text = render(tokenizer, [{"role": "system", "content": "Be brief."}, *chat], add_generation_prompt=True)
    assert text.endswith("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
                         "<|end_header_id|>\n\n<image>\nWhat is it?<|eot_id|><|start_header_id|>assistant"
                         "<|end_header_id|>\n\n")


def test_bad_chat_template_values(tmp_path):
    with pytest.raises(ChatTemplateError, match="--chat-template: 'nope' is neither a file nor a built-in"):
        load_chat_template("nope")
    broken = tmp_path / "broken.jinja"
    broken.write_text("line one\n{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="--chat-template: .*broken.jinja line"):
        load_chat_template(str(broken))
    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n")
    with pytest.raises(ChatTemplateError, match="is empty"):
        load_chat_template(str(empty))
