"""The mixed chunk (runtime/scheduler/chunk_control.py): sized from measured step times so that a step that
prefills beside decode rows costs at most two decode steps, within [MIN_MIXED_CHUNK, --chunked-prefill-size]."""

from runtime.scheduler.chunk_control import MIN_MIXED_CHUNK, MIXED_STEP_FACTOR, START_CHUNK, MixedChunkSize
from tests.scheduler.test_core import assert_matches_reference, make_core, prompt
from tests.scheduler_fixtures import FakeRunner, drive, make_request


def step_ms(decode_rows: int, prefill_tokens: int) -> float:
    """A made-up device: 0.5 ms a step, 0.1 ms a decode row, 0.02 ms a prompt token."""
    return 0.5 + 0.1 * decode_rows + 0.02 * prefill_tokens


def settle(chunk: MixedChunkSize, decode_rows: int, steps: int = 200) -> list[int]:
    """Alternate decode steps with mixed steps that use the whole chunk; the sizes the chunk took."""
    sizes = []
    for _ in range(steps):
        chunk.observe(decode_rows, 0, step_ms(decode_rows, 0))
        chunk.observe(decode_rows, chunk.size, step_ms(decode_rows, chunk.size))
        sizes.append(chunk.size)
    return sizes


def test_few_decode_rows_keep_small_chunks_many_let_them_grow():
    chunk = MixedChunkSize(max_chunk=2048)
    assert chunk.size == START_CHUNK
    # 40 rows: a 4.5 ms decode step; a mixed step within 9 ms holds 225 tokens: the floor
    assert settle(chunk, 40)[-1] == MIN_MIXED_CHUNK
    # 400 rows: a 40.5 ms step; up to 2025 tokens fit in 81 ms: the chunk climbs and stays near it
    sizes = settle(chunk, 400)
    assert min(sizes[-20:]) >= 1600 and max(sizes) <= 2048
    over = [s for s in sizes[-20:] if step_ms(400, s) > MIXED_STEP_FACTOR * step_ms(400, 0)]
    assert len(over) <= 10  # it only probes past the target, then backs off


def test_the_chunk_never_leaves_its_bounds_and_ignores_steps_without_timing():
    chunk = MixedChunkSize(max_chunk=128)  # a user's --chunked-prefill-size below the floor is the cap
    assert chunk.size == 128
    settle(chunk, 1)
    assert chunk.size == 128
    chunk.observe(4, 128, 0.0)  # no timing (a worker double): nothing learned
    chunk.observe(0, 128, 50.0)  # a prefill-only step says nothing about mixed steps
    assert chunk.size == 128 and chunk.decode_ms is not None


class TimedRunner(FakeRunner):
    """The worker double, reporting step times from step_ms."""

    def step(self, plan):
        result = super().step(plan)
        decode_rows = sum(1 for e in plan.extend_lens if e == 1)
        result.forward_ms = step_ms(decode_rows, len(plan.input_ids) - decode_rows)
        return result


def record_mixed_steps(core) -> list[tuple[int, int, int]]:
    """(decode rows, prompt tokens, requests waiting when planned) of every mixed step the core plans."""
    mixed = []
    plan_next = core.plan_next

    def plan_and_record():
        waiting = len(core.waiting)
        batch = plan_next()
        if batch is not None and batch.num_decode and batch.new_tokens:
            mixed.append((batch.num_decode, batch.new_tokens, waiting))
        return batch

    core.plan_next = plan_and_record
    return mixed


def test_the_core_keeps_the_floor_chunk_beside_cheap_decode_steps():
    core, _ = make_core(total=4000, rows=8, context=1024, chunk=1024, max_prefill=64)
    runner = TimedRunner(4000, 8, 1024)
    first = [make_request(f"first{i}", prompt(i, 40), 300, ignore_eos=True) for i in range(3)]
    # prompts arrive one at a time beside three decoding streams: the queue never outnumbers them
    later = {10 + 40 * i: [make_request(f"r{i}", prompt(10 + i, 600), 4, ignore_eos=True)] for i in range(4)}
    mixed = record_mixed_steps(core)
    report = drive(core, runner, {0: first, **later}, overlap=True)
    beside_three = [(tokens, waiting) for rows, tokens, waiting in mixed if rows == 3]
    assert len(beside_three) >= 4 and all(waiting < 3 for _, waiting in beside_three)
    # three decode rows (0.8 ms): a mixed step may take 1.6 ms, far less than any chunk: the floor (the prompts
    # leave a last piece of 600 - 512 tokens), never the whole 1024-token chunk
    assert {tokens for tokens, _ in beside_three} == {MIN_MIXED_CHUNK, 600 - MIN_MIXED_CHUNK}
    assert core.server_info()["mixed_chunk_size"] == MIN_MIXED_CHUNK
    assert_matches_reference(core, report, first + [r for rs in later.values() for r in rs])


def test_a_queue_that_outnumbers_the_decoding_streams_gets_the_whole_chunk():
    assert MixedChunkSize(2048).budget(num_decode=4, num_waiting=4) == 2048
    assert MixedChunkSize(2048).budget(num_decode=5, num_waiting=4) == START_CHUNK
    core, _ = make_core(total=4000, rows=8, context=1024, chunk=1024, max_prefill=64)
    runner = TimedRunner(4000, 8, 1024)
    reqs = [make_request("first", prompt(1, 40), 200, ignore_eos=True)] + [
        make_request(f"r{i}", prompt(10 + i, 900), 4, ignore_eos=True) for i in range(4)]
    mixed = record_mixed_steps(core)
    report = drive(core, runner, {0: reqs[:1], 5: reqs[1:]}, overlap=True)
    burst = [tokens for rows, tokens, waiting in mixed if waiting >= rows]
    # one decode row against four queued prompts: full chunks, while the adaptive size alone would give the floor
    assert burst[:2] == [1024, 1024] and MIN_MIXED_CHUNK < 1024
    assert_matches_reference(core, report, reqs)
