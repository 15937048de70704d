"""End to end: a tiny random LLaVA 1.5 checkpoint (built and saved by transformers with its processor and chat
template) served on the CPU with prefill chunks of 8 tokens (every image run of 16 is cut) and a 1 MiB image arena
(about 100 images: the test traffic wraps it); images through OpenAI image_url parts and SGLang's image_data, against
transformers' greedy tokens; the radix cache reusing a repeated image; every bad image a 400 naming its field."""

from __future__ import annotations

import base64
import http.server
import threading

import pytest
import torch

from tests.e2e.test_server import Server
from tests.multimodal_fixtures import png_bytes, random_image, save_tiny_llava

pytestmark = pytest.mark.slow
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import transformers as tf

    folder = tmp_path_factory.mktemp("llava-tiny")
    model = save_tiny_llava(str(folder / "model"))
    processor = tf.AutoProcessor.from_pretrained(str(folder / "model"))
    media = folder / "media"
    media.mkdir()
    (media / "cat.png").write_bytes(png_bytes(random_image(7)))
    return folder, model, processor


@pytest.fixture(scope="module")
def server(checkpoint):
    folder = checkpoint[0]
    srv = Server(folder / "server.log", "--model-path", str(folder / "model"), "--storage-dir", str(folder / "store"),
                 "--max-total-tokens", "2048", "--allowed-local-media-path", str(folder / "media"),
                 "--image-arena-mb", "1", "--limit-mm-per-prompt", '{"image": 2}', "--chunked-prefill-size", "8")
    srv.ready_line = "Ready: serving "
    yield from srv.serve()


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def expected_text(checkpoint, messages, images) -> str:
    """transformers' greedy continuation of the processor's rendering of `messages`."""
    _, model, processor = checkpoint
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def chat(server, content, **extra) -> tuple[int, dict]:
    return server.post("/v1/chat/completions", {"model": "llava", "temperature": 0, "max_tokens": NEW_TOKENS,
                                                "ignore_eos": True, "messages": [{"role": "user", "content": content}],
                                                **extra})


def test_openai_image_parts_match_transformers(server, checkpoint):
    first, second = random_image(1), random_image(2, 60, 20)
    status, body = chat(server, [{"type": "text", "text": "Compare"},
                                 {"type": "image_url", "image_url": {"url": data_url(first)}},
                                 {"type": "image_url", "image_url": {"url": data_url(second), "detail": "high"}}])
    assert status == 200, body
    messages = [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                             {"type": "image"}]}]
    assert body["choices"][0]["message"]["content"] == expected_text(checkpoint, messages, [first, second])


def test_native_image_data_and_the_radix_cache(server, checkpoint):
    image = random_image(3)
    encoded = base64.b64encode(png_bytes(image)).decode()
    request = {"text": "USER: <image>\nWhat is it? ASSISTANT:", "image_data": encoded,
               "sampling_params": {"temperature": 0, "max_new_tokens": 2}}
    status, first = server.post("/generate", request)
    assert status == 200, first
    status, again = server.post("/generate", request)
    assert status == 200, again
    image_tokens = 16
    assert again["meta_info"]["cached_tokens"] >= image_tokens  # the same image: its tokens' KV is reused
    assert again["text"] == first["text"]
    status, other = server.post("/generate", {**request, "image_data": data_url(random_image(4))})
    assert status == 200, other
    assert other["meta_info"]["cached_tokens"] < 4 + image_tokens // 2  # another image shares only the text before
    status, scored = server.post("/generate", {**request, "return_logprob": True, "logprob_start_len": 0})
    assert status == 200, scored
    prompt = scored["meta_info"]["input_token_logprobs"]  # image positions are scored as the image token
    assert len(prompt) == scored["meta_info"]["prompt_tokens"]
    assert [entry[1] for entry in prompt].count(checkpoint[2].tokenizer.convert_tokens_to_ids("<image>")) == 16


def test_local_files_only_under_the_allowed_folder(server, checkpoint):
    media = checkpoint[0] / "media"
    status, body = server.post("/generate", {"text": "<image>\nDescribe.", "image_data": str(media / "cat.png"),
                                             "sampling_params": {"max_new_tokens": 2}})
    assert status == 200, body
    status, body = server.post("/generate", {"text": "<image>\nDescribe.", "image_data": "/etc/passwd",
                                             "sampling_params": {"max_new_tokens": 2}})
    assert status == 400 and "image_data" in body["error"]["message"] and "outside" in body["error"]["message"]


@pytest.fixture(scope="module")
def local_http(checkpoint):
    """An HTTP server on the loopback serving a PNG: what an SSRF would reach."""
    payload = png_bytes(random_image(9))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
    httpd.shutdown()


@pytest.mark.parametrize("url", ["LOCAL", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png",
                                 "http://[::1]/x.png"])
def test_urls_to_non_public_addresses_are_refused(server, local_http, url):
    url = local_http if url == "LOCAL" else url
    status, body = chat(server, [{"type": "image_url", "image_url": {"url": url}}])
    assert status == 400, body
    message = body["error"]["message"]
    assert "messages[0].content[0].image_url" in message and "non-public address" in message


@pytest.mark.parametrize("part, wanted", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="}}, "not a readable"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "invalid base64"),
    ({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}, "not an image"),
    ({"type": "image_url", "image_url": {}}, "image_url.url"),
    ({"type": "image_url", "image_url": {"url": "x", "detail": "ultra"}}, "detail"),
    ({"type": "input_audio", "input_audio": {}}, "only text and image_url parts"),
])
def test_bad_images_are_a_400_naming_the_part(server, part, wanted):
    status, body = chat(server, [{"type": "text", "text": "Hi"}, part])
    assert status == 400, body
    assert "messages[0].content[1]" in body["error"]["message"] and wanted in body["error"]["message"]


def test_the_arena_wraps_and_every_request_is_answered(server):
    """More image bytes than the arena holds, 8 requests at a time: blocks are released in order as requests finish,
    so every request gets its answer (none a 503), and the same image gives the same text after the wrap."""
    import concurrent.futures

    image = data_url(random_image(20))

    def one(i: int):
        return server.post("/generate", {"text": "<image>\nDescribe.", "image_data": image if i % 40 == 0 else
                                         data_url(random_image(100 + i)),
                                         "sampling_params": {"temperature": 0, "max_new_tokens": 2}})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(130)))
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:2]
    assert len({answers[i][1]["text"] for i in (0, 40, 80, 120)}) == 1


def test_too_many_images_and_text_only_chat(server):
    url = data_url(random_image(5))
    status, body = chat(server, [{"type": "image_url", "image_url": {"url": url}}] * 3)
    assert status == 400 and "--limit-mm-per-prompt" in body["error"]["message"], body
    status, body = chat(server, "Hello there")
    assert status == 200 and body["usage"]["completion_tokens"] == NEW_TOKENS, body
