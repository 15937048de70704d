"""ImageBlockLedger: arena blocks of images are released in allocation order, only once their request has finished
and no batch planned before that is still in flight."""

from __future__ import annotations

from runtime.messages import ArenaTensor, GenerateRequest, ImageItem, SamplingParams
from runtime.scheduler.image_blocks import ImageBlockLedger
from shm.arena import ArenaBlock


def _request(rid: str, start: int, nbytes: int) -> GenerateRequest:
    block = ArenaBlock(start, nbytes, start + nbytes)
    item = ImageItem(offset=0, length=4, tensors={"pixel_values": ArenaTensor("rt1_images", block, [nbytes], "uint8")})
    return GenerateRequest(rid=rid, input_ids=[1, 2], sampling=SamplingParams(), images=[item])


def test_release_waits_for_older_blocks_and_batches_in_flight():
    ledger = ImageBlockLedger()
    ledger.add(_request("a", 0, 64), last_batch=-1, accepted=True)
    ledger.add(_request("b", 64, 64), last_batch=-1, accepted=True)
    ledger.add(GenerateRequest(rid="text", input_ids=[1], sampling=SamplingParams()), last_batch=-1, accepted=True)
    ledger.add(_request("c", 128, 64), last_batch=-1, accepted=False)  # rejected: done at once
    ledger.finished("b", last_batch=5)
    assert ledger.releasable(oldest_in_flight=9) == []  # a still runs: b's block is not freed
    ledger.finished("a", last_batch=7)
    assert ledger.releasable(oldest_in_flight=7) == []  # batch 7 (may read a's image) is in flight
    assert ledger.releasable(oldest_in_flight=8) == [("rt1_images", ArenaBlock(128, 64, 192))]  # a, b, c at once
    assert len(ledger) == 0
