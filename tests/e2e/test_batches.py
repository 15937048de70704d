"""End to end on the default model (CPU) with the official openai client: the SRT page's three quick-start calls
against one server, embeddings on a generation server, /v1/files, /v1/batches (malformed lines, cancel), and
durability: SIGKILL the server in the middle of a batch, restart it on the same --storage-dir, and the batch
finishes without rerunning the requests that had finished (their result lines come back byte for byte).

One server for the module (restarted by the last test); the tests run in file order."""

from __future__ import annotations

import base64
import json
import signal
import sqlite3
import subprocess
import time

import numpy as np
import psutil
import pytest

from tests.e2e.test_server import Server

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

SERVER_FLAGS = ("--max-running-requests", "4", "--max-total-tokens", "8192")
BATCH_TIMEOUT_S = 300


class Deployment:
    """The module's server, restartable on the same storage directory."""

    def __init__(self, folder):
        self.folder = folder
        self.storage = folder / "store"
        self.starts = 0
        self.server: Server | None = None

    def start(self) -> Server:
        self.starts += 1
        self.server = Server(self.folder / f"server{self.starts}.log", "--storage-dir", str(self.storage),
                             *SERVER_FLAGS)
        self.server.wait_ready()
        return self.server

    def client(self):
        return openai.OpenAI(base_url=self.server.url + "/v1", api_key="EMPTY")

    def stop(self) -> None:
        """SIGTERM, so the server removes its shared memory (a SIGKILLed one leaves it to the next start)."""
        proc = self.server.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        self.server.kill()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    deployment = Deployment(tmp_path_factory.mktemp("batches"))
    deployment.start()
    try:
        yield deployment
    finally:
        deployment.stop()


def chat_line(custom_id: str, content: str, max_tokens: int = 8, **extra) -> str:
    body = {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def upload(client, tmp_path, name: str, lines: list[str]):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="batch")


def wait_batch(client, batch_id: str, statuses=("completed", "failed", "cancelled")):
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.5)
    pytest.fail(f"batch {batch_id} still {batch.status} after {BATCH_TIMEOUT_S} s")


def jsonl(client, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_the_srt_quick_start_runs_verbatim_against_one_server(deployment):
    client = openai.Client(base_url=deployment.server.url + "/v1", api_key="EMPTY")
    # Text completion
    response = client.completions.create(
        model="default",
        prompt="The capital of France is",
        temperature=0,
        max_tokens=32,
    )
    assert "Paris" in response.choices[0].text
    # Chat completion
    response = client.chat.completions.create(
        model="default",
        messages=[
            {"role": "system", "content": "You are a helpful AI assistant"},
            {"role": "user", "content": "List 3 countries and their capitals."},
        ],
        temperature=0,
        max_tokens=64,
    )
    assert response.choices[0].message.content
    # Text embedding
    response = client.embeddings.create(
        model="default",
        input="How are you today",
    )
    vector = np.array(response.data[0].embedding)
    assert vector.shape == (576,) and abs(np.linalg.norm(vector) - 1) < 1e-4
    assert response.usage.prompt_tokens == response.usage.total_tokens > 0


def test_embeddings_inputs_formats_and_errors(deployment):
    server, client = deployment.server, deployment.client()
    texts = ["The capital of France is", "Hello"]
    as_text = client.embeddings.create(model="default", input=texts, encoding_format="float")
    ids = [server.post("/encode", {"text": t})[1] for t in texts]
    status, as_ids = server.post("/v1/embeddings", {"input": [[1, 2, 3], [4, 5]], "encoding_format": "base64"})
    assert status == 200 and [d["index"] for d in as_ids["data"]] == [0, 1]
    assert len(np.frombuffer(base64.b64decode(as_ids["data"][0]["embedding"]), dtype="<f4")) == 576
    for item, native in zip(as_text.data, ids):  # /encode and /v1/embeddings agree, batched or not
        np.testing.assert_allclose(item.embedding, native["embedding"], atol=1e-5)
    single = client.embeddings.create(model="default", input=texts[1], encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, as_text.data[1].embedding, atol=1e-5)
    status, out = server.post("/v1/embeddings", {"input": "x", "dimensions": 64})
    assert status == 400 and out["error"]["param"] == "dimensions"
    status, out = server.post("/v1/embeddings", {"input": [7] * 9000})
    assert status == 400 and "context length" in out["error"]["message"]
    status, out = server.post("/v1/embeddings", {"input": ["a", [1, 2]]})
    assert status == 400 and out["error"]["param"] == "input"
    status, out = server.post("/v1/embeddings", {"input": "x", "encoding_format": "int8"})
    assert status == 400 and out["error"]["param"] == "encoding_format"


def test_files_upload_list_retrieve_content_delete(deployment, tmp_path):
    client = deployment.client()
    uploaded = upload(client, tmp_path, "f.jsonl", [chat_line("a", "Hi")])
    assert uploaded.purpose == "batch" and uploaded.filename == "f.jsonl" and uploaded.bytes > 0
    assert client.files.retrieve(uploaded.id).bytes == uploaded.bytes
    assert uploaded.id in [f.id for f in client.files.list(purpose="batch").data]
    assert client.files.content(uploaded.id).text == chat_line("a", "Hi") + "\n"
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")


def test_a_batch_with_malformed_lines_completes_with_an_error_file(deployment, tmp_path):
    client = deployment.client()
    lines = [chat_line(f"ok-{i}", f"Say the number {i}") for i in range(3)]
    lines.insert(1, "{not json")
    lines.append(chat_line("ok-0", "a duplicate custom_id"))
    lines.append(json.dumps({"custom_id": "wrong-url", "method": "POST", "url": "/v1/completions", "body": {}}))
    lines.append(chat_line("too-many", "x", max_tokens=10**6))
    batch = client.batches.create(input_file_id=upload(client, tmp_path, "in.jsonl", lines).id,
                                  endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "t"})
    assert batch.status == "validating" and batch.metadata == {"run": "t"}
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (7, 3, 4)
    outputs = jsonl(client, batch.output_file_id)
    assert [o["custom_id"] for o in outputs] == ["ok-0", "ok-1", "ok-2"]
    for output in outputs:
        assert output["response"]["status_code"] == 200 and output["error"] is None
        assert output["response"]["body"]["object"] == "chat.completion"
    errors = jsonl(client, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == [None, "ok-0", "wrong-url", "too-many"]
    assert errors[0]["error"]["line"] == 2 and errors[1]["error"]["code"] == "duplicate_custom_id"
    assert errors[3]["response"]["status_code"] == 400
    assert batch.id in [b.id for b in client.batches.list().data]


def test_completions_and_embeddings_batches(deployment, tmp_path):
    client = deployment.client()
    completion_lines = [json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                    "body": {"model": "default", "prompt": "The capital of France is",
                                             "max_tokens": 4, "temperature": 0, "stream": True}}) for i in range(2)]
    embedding_lines = [json.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                                   "body": {"model": "default", "input": ["Hello", "world"][i]}}) for i in range(2)]
    ids = {}
    for endpoint, lines in (("/v1/completions", completion_lines), ("/v1/embeddings", embedding_lines)):
        ids[endpoint] = client.batches.create(input_file_id=upload(client, tmp_path, "x.jsonl", lines).id,
                                              endpoint=endpoint, completion_window="24h").id
    completions = wait_batch(client, ids["/v1/completions"])
    outputs = jsonl(client, completions.output_file_id)
    assert [o["response"]["body"]["choices"][0]["text"] for o in outputs] == [outputs[0]["response"]["body"]
                                                                              ["choices"][0]["text"]] * 2
    assert " Paris" in outputs[0]["response"]["body"]["choices"][0]["text"]  # the stream flag was dropped
    embeddings = wait_batch(client, ids["/v1/embeddings"])
    assert embeddings.error_file_id is None
    vectors = [o["response"]["body"]["data"][0]["embedding"] for o in jsonl(client, embeddings.output_file_id)]
    interactive = client.embeddings.create(model="default", input="world", encoding_format="float")
    np.testing.assert_allclose(vectors[1], interactive.data[0].embedding, atol=1e-5)


def test_cancel_keeps_what_finished(deployment, tmp_path):
    client = deployment.client()
    lines = [chat_line(f"r{i}", f"Write a long story number {i}", max_tokens=16, ignore_eos=True) for i in range(40)]
    batch = client.batches.create(input_file_id=upload(client, tmp_path, "c.jsonl", lines).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    wait_for_results(deployment.storage, batch.id, 1)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_batch(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    counts = batch.request_counts
    assert 1 <= counts.completed < counts.total == 40
    assert len(jsonl(client, batch.output_file_id)) == counts.completed
    done = client.batches.create(input_file_id=upload(client, tmp_path, "d.jsonl", [chat_line("d", "Hi", 1)]).id,
                                 endpoint="/v1/chat/completions", completion_window="24h")
    assert wait_batch(client, done.id).status == "completed"
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(done.id)


def finished_results(storage, batch_id: str) -> dict[int, bytes]:
    with sqlite3.connect(storage / "store.sqlite3") as db:
        rows = db.execute("SELECT line, result FROM batch_results WHERE batch_id = ?", (batch_id,)).fetchall()
    return {line: bytes(result) for line, result in rows}


def wait_for_results(storage, batch_id: str, count: int) -> dict[int, bytes]:
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    while time.monotonic() < deadline:
        results = finished_results(storage, batch_id)
        if len(results) >= count:
            return results
        time.sleep(0.2)
    pytest.fail(f"batch {batch_id}: fewer than {count} results after {BATCH_TIMEOUT_S} s")


def test_sigkill_mid_batch_then_restart_resumes_without_rerunning(deployment, tmp_path):
    client = deployment.client()
    earlier = client.batches.list().data
    total = 12
    lines = [chat_line(f"k{i}", f"Tell me about the number {i}", max_tokens=16, ignore_eos=True)
             for i in range(total)]
    batch = client.batches.create(input_file_id=upload(client, tmp_path, "k.jsonl", lines).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    wait_for_results(deployment.storage, batch.id, 2)
    server = deployment.server
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(30)
    psutil.wait_procs(server.children, timeout=30)  # the actors die with the launcher (pdeathsig)
    before = finished_results(deployment.storage, batch.id)
    assert 2 <= len(before) < total, "the kill must land in the middle of the batch"

    deployment.start()
    client = deployment.client()
    assert {b.id for b in earlier} <= {b.id for b in client.batches.list().data}  # completed batches survive
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == total
    output = client.files.content(batch.output_file_id).content.splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in output) == sorted(f"k{i}" for i in range(total))
    for line, result in before.items():  # finished before the kill: the same result line, not a rerun
        assert output[line] == result
    assert "taking it over" in deployment.server.output()
