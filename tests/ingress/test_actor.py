"""The ingress actor in a child process: it listens before Ready, serves HTTP through its Frontend
(the test plays scheduler and detokenizer on the rings), refuses a busy port naming --port, and
exits cleanly on Shutdown. --skip-tokenizer-init keeps the child light (no transformers import)."""

import http.client
import json
import socket
import threading
import uuid

import msgspec
import pytest

from actors.spec import ActorSpec
from actors.supervisor import ActorStartError, Supervisor
from runtime.ingress.actor import IngressConfig, IngressInfo
from runtime.messages import (
    FinishReason,
    GenerateRequest,
    ModelInfo,
    RequestMeta,
    ServerInfoReply,
    ServerInfoRequest,
    TextUpdate,
    TextUpdates,
)
from runtime.server_args import ServerArgs
from shm import run_prefix

MODEL_INFO = ModelInfo(architecture="LlamaForCausalLM", vocab_size=49152, context_length=64, eos_token_ids=[2],
                       max_total_tokens=4096, max_running_requests=16, dtype="float32", device="cpu")


def ingress_spec(sup: Supervisor, args: ServerArgs):
    to_scheduler = sup.channel("ingress_to_scheduler", "runtime.messages:IngressToScheduler", 1 << 16)
    from_scheduler = sup.channel("scheduler_to_ingress", "runtime.messages:SchedulerToIngress", 1 << 16)
    from_detokenizer = sup.channel("detokenizer_to_ingress", "runtime.messages:DetokenizerToIngress", 1 << 16)
    config = msgspec.Raw(msgspec.json.encode(IngressConfig(args, MODEL_INFO)))
    spec = ActorSpec("ingress", "runtime.ingress:IngressActor", config,
                     inbound=[from_scheduler, from_detokenizer], outbound=[to_scheduler])
    return spec, to_scheduler, from_scheduler, from_detokenizer


def play_engine(requests, to_ingress, detokenizer, stop: threading.Event):
    """Echo each prompt back as "<id>" text, one update per request; answer server_info."""
    while not stop.is_set():
        msg = requests.get(timeout=0.05)
        match msg:
            case GenerateRequest(rid=rid, input_ids=ids):
                meta = RequestMeta(prompt_tokens=len(ids), completion_tokens=len(ids), cached_tokens=0)
                text = "".join(f"<{t}>" for t in ids)
                detokenizer.put(TextUpdates([TextUpdate(rid, text, ids, meta, FinishReason(type="length",
                                                                                           length=len(ids)))]))
            case ServerInfoRequest(token=token):
                to_ingress.put(ServerInfoReply(token, {"running": msgspec.Raw(msgspec.msgpack.encode(0))}))


def request(port, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, path, None if body is None else json.dumps(body),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_ingress_serves_http_and_stops_on_shutdown():
    sup = Supervisor(prefix=f"{run_prefix()}{uuid.uuid4().hex[:8]}_", ready_timeout=60)
    stop = threading.Event()
    try:
        args = ServerArgs(port=0, skip_tokenizer_init=True, served_model_name="echo")
        spec, to_scheduler, from_scheduler, from_detokenizer = ingress_spec(sup, args)
        info = msgspec.msgpack.decode(sup.start(spec), type=IngressInfo)
        assert info.port > 0
        requests = sup.connect(to_scheduler)
        to_ingress, detokenizer = sup.connect(from_scheduler, writer=True), sup.connect(from_detokenizer, writer=True)
        engine = threading.Thread(target=play_engine, args=(requests, to_ingress, detokenizer, stop), daemon=True)
        engine.start()

        assert request(info.port, "GET", "/health")[0] == 200
        status, body = request(info.port, "POST", "/generate",
                               {"input_ids": [11, 12, 13], "sampling_params": {"max_new_tokens": 3}})
        assert status == 200, body
        reply = json.loads(body)
        assert reply["text"] == "<11><12><13>" and reply["output_ids"] == [11, 12, 13]
        status, body = request(info.port, "POST", "/generate", {"input_ids": [1, 10**6]})
        assert status == 400 and b"input_ids" in body
        status, body = request(info.port, "GET", "/v1/models")
        assert status == 200 and json.loads(body)["data"][0]["id"] == "echo"
        status, body = request(info.port, "GET", "/get_server_info")
        assert status == 200
        assert json.loads(body)["internal_states"] == [{"running": 0, "ingress_unfinished_sequences": 0}]

        stop.set()
        engine.join()
        for channel in (requests, to_ingress, detokenizer):
            channel.close()
        assert sup.stop(grace_s=0.5) == 0
        assert sup.exit_codes == {"ingress": 0}
    finally:
        stop.set()
        sup.stop()


def test_busy_port_fails_the_start_naming_the_flag():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sup = Supervisor(prefix=f"{run_prefix()}{uuid.uuid4().hex[:8]}_", ready_timeout=60)
        try:
            spec = ingress_spec(sup, ServerArgs(port=port, skip_tokenizer_init=True))[0]
            with pytest.raises(ActorStartError, match=f"--port {port}"):
                sup.start(spec)
        finally:
            sup.stop()
