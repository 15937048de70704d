"""BatchRunner over a fake frontend (no engine): priorities, malformed lines, limits, cancel, and taking over a
batch whose server died, running only the lines without a result."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from runtime.ingress.api.batch_runner import BatchRunner, _parse_line, owner_alive, process_owner
from runtime.ingress.store import Store
from runtime.ingress.store.batches import BatchRecord, RequestCounts
from runtime.messages import BATCH_PRIORITY
from tests.fake_frontend import FakeFrontend

ENDPOINT = "/v1/completions"
DEAD_OWNER = f"{socket.gethostname()}:999999999:1.000"


def line(custom_id: str, prompt: list[int], **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
                       "body": {"prompt": prompt, "max_tokens": 3, **body}})


def make_batch(runner: BatchRunner, lines: list[str], owner: str, status: str = "validating",
               total: int = 0) -> str:
    file = runner.files.create("in.jsonl", "batch", ["\n".join(lines).encode() + b"\n"])
    record = BatchRecord(id=f"batch_{len(runner.batches.list(100, None)[0])}", endpoint=ENDPOINT,
                         input_file_id=file.id, completion_window="24h", created_at=1, status=status,
                         request_counts=RequestCounts(total=total))
    runner.batches.create(record, owner)
    return record.id


async def until(predicate, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def setup(tmp_path):
    fake = FakeFrontend(tokenizer=None)
    store = Store.open(tmp_path)
    yield fake, store
    store.close()


def outputs(runner: BatchRunner, file_id: str) -> list[dict]:
    return [json.loads(x) for x in runner.files.read(file_id).splitlines()]


def test_a_batch_runs_at_batch_priority_and_files_errors(setup):
    fake, store = setup

    async def main():
        runner = BatchRunner(fake, store, max_requests=100, window=2)
        runner.start()
        lines = [line("a", [5, 6]), "{oops", line("b", [7]), line("c", [8], max_tokens=-1), line("a", [9])]
        batch_id = make_batch(runner, lines, runner.owner)
        runner.submit(batch_id)
        await until(lambda: runner.batches.get(batch_id).status == "completed")
        await runner.close()
        return runner, runner.batches.get(batch_id)

    runner, record = run(main())
    assert (record.request_counts.total, record.request_counts.completed, record.request_counts.failed) == (5, 2, 3)
    assert {call.priority for call in fake.calls} == {BATCH_PRIORITY}
    ok = outputs(runner, record.output_file_id)
    assert [o["custom_id"] for o in ok] == ["a", "b"]
    assert ok[0]["response"]["body"]["choices"][0]["text"] == " <5> <6> <5>"
    errors = outputs(runner, record.error_file_id)
    assert [e["custom_id"] for e in errors] == [None, "c", "a"]
    assert errors[1]["response"]["status_code"] == 400 and errors[2]["error"]["code"] == "duplicate_custom_id"


def test_an_orphaned_batch_resumes_with_only_the_unfinished_lines(setup):
    fake, store = setup

    async def main():
        runner = BatchRunner(fake, store, max_requests=100, window=3)
        batch_id = make_batch(runner, [line(f"r{i}", [10 + i]) for i in range(5)], DEAD_OWNER, "in_progress", 5)
        for done in (0, 3):  # finished before its server died
            runner.batches.record_result(batch_id, done, True, b'{"custom_id":"r%d","kept":true}' % done)
        runner.start()  # the scan at start takes it over
        await until(lambda: runner.batches.get(batch_id).status == "completed")
        await runner.close()
        return runner, runner.batches.get(batch_id)

    runner, record = run(main())
    assert sorted(call.input_ids[0] for call in fake.calls) == [11, 12, 14]  # lines 1, 2, 4 only
    assert record.request_counts.completed == 5
    results = outputs(runner, record.output_file_id)
    assert [r["custom_id"] for r in results] == [f"r{i}" for i in range(5)]
    assert results[0] == {"custom_id": "r0", "kept": True} and results[3] == {"custom_id": "r3", "kept": True}


def test_a_live_owners_batch_is_left_alone(setup):
    fake, store = setup

    async def main():
        runner = BatchRunner(fake, store, max_requests=100, window=2)
        batch_id = make_batch(runner, [line("a", [1])], process_owner(), "in_progress", 1)
        runner.owner = "elsewhere:1:1"
        runner.start()
        await asyncio.sleep(0.3)
        await runner.close()
        return runner.batches.get(batch_id)

    assert run(main()).status == "in_progress" and not fake.calls
    assert owner_alive(process_owner()) and not owner_alive(DEAD_OWNER) and not owner_alive(None)


def test_cancel_finalizes_with_what_finished(setup):
    fake, store = setup
    fake.token_delay_s = 0.05

    async def main():
        runner = BatchRunner(fake, store, max_requests=100, window=1)
        runner.start()
        batch_id = make_batch(runner, [line(f"r{i}", [i + 1]) for i in range(20)], runner.owner)
        runner.submit(batch_id)
        await until(lambda: runner.batches.get(batch_id).request_counts.completed >= 2)
        assert runner.cancel(batch_id).status == "cancelling"
        await until(lambda: runner.batches.get(batch_id).status == "cancelled")
        assert runner.cancel(batch_id) is None  # past cancelling
        await runner.close()
        return runner, runner.batches.get(batch_id)

    runner, record = run(main())
    assert 2 <= record.request_counts.completed < 20 and record.cancelled_at is not None
    assert len(outputs(runner, record.output_file_id)) == record.request_counts.completed
    assert fake.aborted  # the request in flight was aborted


def test_limits_and_missing_files_fail_the_batch(setup):
    fake, store = setup

    async def main():
        runner = BatchRunner(fake, store, max_requests=2, window=2)
        runner.start()
        too_many = make_batch(runner, [line(f"r{i}", [1]) for i in range(3)], runner.owner)
        gone = make_batch(runner, [line("a", [1])], runner.owner)
        runner.files.delete(runner.batches.get(gone).input_file_id)
        for batch_id in (too_many, gone):
            runner.submit(batch_id)
        await until(lambda: all(runner.batches.get(b).status == "failed" for b in (too_many, gone)))
        await runner.close()
        return [runner.batches.get(b).errors.data[0].code for b in (too_many, gone)]

    assert run(main()) == ["too_many_requests", "file_not_found"]
    assert not fake.calls


def test_line_parsing():
    seen: set[str] = set()
    job = _parse_line(0, line("a", [1], stream=True, stream_options={"include_usage": True}).encode(), ENDPOINT, seen)
    assert json.loads(job.body) == {"prompt": [1], "max_tokens": 3}  # a batch never streams
    assert _parse_line(1, line("a", [1]).encode(), ENDPOINT, seen).code == "duplicate_custom_id"
    wrong = json.dumps({"custom_id": "w", "method": "GET", "url": ENDPOINT, "body": {}}).encode()
    assert "method must be POST" in _parse_line(2, wrong, ENDPOINT, seen).message
    missing = json.dumps({"custom_id": "m", "url": ENDPOINT, "body": {}}).encode()
    error = _parse_line(3, missing, ENDPOINT, seen)
    assert error.custom_id == "m" and "method" in error.message and error.message.startswith("line 4:")
