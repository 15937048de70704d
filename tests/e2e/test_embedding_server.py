"""End to end: `python -m runtime --is-embedding` on a tiny random bare MistralModel checkpoint (SmolLM2's
tokenizer, a sentence-transformers mean-pooling + Normalize config, matryoshka dimensions), driven with the openai
client and compared with transformers' pooled vectors."""

from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest
import torch

from tests.e2e.test_server import Server
from tests.worker.test_pooling import write_sentence_transformers

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

CONTEXT = 256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import MistralConfig, MistralModel

    from tests.fake_frontend import smollm2_tokenizer

    folder = str(tmp_path_factory.mktemp("e5-tiny"))
    tokenizer = smollm2_tokenizer()
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                           initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = MistralModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    write_sentence_transformers(folder, "mean_tokens", normalize=True)
    with open(os.path.join(folder, "config.json")) as f:
        hf_config = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**hf_config, "matryoshka_dimensions": [16, 32]}, f)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedding-server")
    srv = Server(folder / "server.log", "--model-path", checkpoint[0], "--is-embedding", "--storage-dir",
                 str(folder / "store"), "--max-total-tokens", "2048")
    srv.ready_line = "Ready: serving "
    yield from srv.serve()


def reference(model, tokenizer, text: str) -> np.ndarray:
    with torch.inference_mode():
        hidden = model(torch.tensor([tokenizer.encode(text)])).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(0), dim=-1).numpy()


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_embeddings_match_transformers_batched_and_in_base64(server, checkpoint):
    _, model, tokenizer = checkpoint
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY")
    texts = ["How are you today", "The capital of France is Paris.", "Hi"]
    floats = client.embeddings.create(model="e5", input=texts, encoding_format="float")
    encoded = client.embeddings.create(model="e5", input=texts)  # the client asks for base64
    for text, plain, packed in zip(texts, floats.data, encoded.data):
        assert cosine(plain.embedding, reference(model, tokenizer, text)) > 0.999
        np.testing.assert_allclose(plain.embedding, packed.embedding, atol=1e-6)
    assert floats.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in texts)
    ids = [tokenizer.encode(t) for t in texts[:2]]
    status, out = server.post("/v1/embeddings", {"input": ids, "encoding_format": "base64"})
    assert status == 200
    for item, plain in zip(out["data"], floats.data):
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4"),
                                   plain.embedding, atol=1e-5)


def test_matryoshka_dimensions_and_limits(server, checkpoint):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY")
    full = client.embeddings.create(model="e5", input="Hello there", encoding_format="float").data[0].embedding
    short = client.embeddings.create(model="e5", input="Hello there", dimensions=16,
                                     encoding_format="float").data[0].embedding
    assert len(short) == 16 and abs(np.linalg.norm(short) - 1) < 1e-5
    assert cosine(short, full[:16]) > 0.9999
    status, out = server.post("/v1/embeddings", {"input": "x", "dimensions": 20})
    assert status == 400 and "[16, 32]" in out["error"]["message"]
    status, out = server.post("/v1/embeddings", {"input": [5] * CONTEXT})  # the whole context is fine
    assert status == 200
    status, out = server.post("/v1/embeddings", {"input": [5] * (CONTEXT + 1)})
    assert status == 400 and "context length" in out["error"]["message"]


def test_an_embedding_server_refuses_generation_and_reports_itself(server):
    status, out = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
    assert status == 400 and "embedding model" in out["error"]["message"]
    status, info = server.get("/get_model_info")
    assert status == 200 and info["is_generation"] is False and info["architectures"] == ["MistralModel"]
    assert server.get("/health_generate")[0] == 200
    status, out = server.post("/encode", {"text": ["a", "b"]})
    assert status == 200 and [len(o["embedding"]) for o in out] == [64, 64]
