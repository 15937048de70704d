"""The data-parallel dispatcher: which replica gets each request, where aborts go, what the load says."""

import pytest

from runtime.ingress.dispatcher import Dispatcher, merge_states
from runtime.messages import AbortRequest, FlushCacheRequest, GenerateRequest, SamplingParams


class Recorder:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)


def request(rid: str) -> GenerateRequest:
    return GenerateRequest(rid=rid, input_ids=[1, 2, 3], sampling=SamplingParams())


def make(n: int, method: str) -> tuple[Dispatcher, list[Recorder]]:
    senders = [Recorder() for _ in range(n)]
    return Dispatcher(senders, method), senders


def test_round_robin_takes_the_replicas_in_turn_and_aborts_follow_the_request():
    d, senders = make(3, "round_robin")
    assert [d.submit(request(f"r{i}")) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    d.abort("r4")
    assert senders[1].sent[-1] == AbortRequest("r4")
    d.finished("r4")
    d.abort("r4")  # finished: nothing holds it any more
    assert len(senders[1].sent) == 3
    assert [d.load(r)["unfinished"] for r in range(3)] == [3, 1, 2]


def test_shortest_queue_takes_the_replica_with_fewest_unfinished_requests():
    d, _ = make(2, "shortest_queue")
    assert [d.submit(request(f"a{i}")) for i in range(4)] == [0, 1, 0, 1]  # ties go round
    for rid in ("a0", "a2"):
        d.finished(rid)
    assert [d.submit(request(f"b{i}")) for i in range(2)] == [0, 0]  # replica 1 still holds two
    assert d.load(0) == {"dispatched": 4, "unfinished": 2} and d.load(1) == {"dispatched": 2, "unfinished": 2}


@pytest.mark.parametrize("method", ["round_robin", "shortest_queue"])
def test_the_samples_of_one_prompt_go_to_one_replica(method):
    d, _ = make(2, method)
    d.submit(request("other"))
    replicas = {d.submit(request(f"g-{j}"), group="g") for j in range(4)}
    assert len(replicas) == 1
    for j in range(4):
        d.finished(f"g-{j}")
    assert not d._groups  # the group is forgotten once all its requests finished


def test_broadcast_reaches_every_replica():
    d, senders = make(2, "round_robin")
    d.broadcast(FlushCacheRequest(token=5))
    assert all(s.sent == [FlushCacheRequest(token=5)] for s in senders)


def test_merged_state_sums_counts_and_averages_ratios():
    states = [{"dp_rank": 0, "running": 2, "queued": 1, "token_usage": 0.5, "radix_cache": True},
              {"dp_rank": 1, "running": 3, "queued": 0, "token_usage": 0.25, "radix_cache": True}]
    assert merge_states(states) == {"running": 5, "queued": 1, "token_usage": 0.375, "radix_cache": True,
                                    "dp_size": 2}
    assert merge_states(states[:1]) == states[0]


class RecordingChannel:
    """A ring that always has room (what OrderedSender puts on)."""

    def __init__(self):
        self.sent = []

    def put(self, msg, timeout=None):
        self.sent.append(msg)


def test_frontend_spreads_embeddings_and_prioritised_requests_over_the_replicas():
    import asyncio

    from runtime.ingress.frontend import Frontend
    from runtime.messages import EmbeddingResult, EmbeddingResults, LogprobOptions, ModelInfo
    from runtime.server_args import ServerArgs

    info = ModelInfo(architecture="LlamaModel", vocab_size=100, context_length=64, eos_token_ids=[2],
                     max_total_tokens=4096, max_running_requests=4, dtype="float32", device="cpu")
    channels = [RecordingChannel(), RecordingChannel()]
    frontend = Frontend(ServerArgs(), info, None, channels)
    assert frontend.max_unfinished == 2 * 4 + ServerArgs().max_queued_requests

    async def scenario():
        tasks = [asyncio.ensure_future(frontend.embed(f"e{i}", [1, 2, 3], priority=5)) for i in range(2)]
        await asyncio.sleep(0)
        for channel in channels:
            (sent,) = channel.sent
            assert sent.embed and sent.priority == 5
        for channel in channels:
            rid = channel.sent[0].rid
            frontend.on_message(EmbeddingResults([EmbeddingResult(rid, b"\0" * 4, 3, 0)]))
        results = await asyncio.gather(*tasks)
        assert [r.rid for r in results] == ["e0", "e1"]
        assert [frontend.dispatcher.load(i)["unfinished"] for i in range(2)] == [0, 0]
        stream = frontend.generate("g", [1, 2], SamplingParams(), LogprobOptions(), False, priority=-1)
        pending = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        (request,) = channels[0].sent[1:]  # round robin: replica 0's turn again
        assert request.rid == "g" and request.priority == -1
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        await stream.aclose()
        assert isinstance(channels[0].sent[-1], AbortRequest)
        assert frontend.dispatcher.load(0)["unfinished"] == 0

    asyncio.run(scenario())
    frontend.close()
