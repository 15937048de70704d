"""IncrementalDetokenizer on the real SmolLM2 tokenizer (byte-level BPE: multi-byte characters split
over tokens all the time)."""

import random

import pytest

from runtime.detokenizer.incremental import REPLACEMENT_CHAR, IncrementalDetokenizer, TokenTextDecoder, detokenize_batch
from runtime.messages import FinishReason
from runtime.server_args import ServerArgs
from runtime.tokenizer import load_tokenizer

TEXTS = [
    "日本語のテキスト 😀👍🏽 émoji ñ 中文字符 🇫🇷 \U0001F9D1\u200D\U0001F4BB done",
    "Plain ASCII, with punctuation: (a, b) -> c!",
    "한국어 문장과 العربية и русский текст 🎉🎉🎉",
    "tabs\tand\nnewlines\n\n  indented   spaces",
]
LENGTH = FinishReason(type="length", length=1)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ServerArgs())


@pytest.fixture(scope="module")
def decoder(tokenizer):
    return TokenTextDecoder(tokenizer)


def stream(decoder, state, ids, chunk_sizes, finish=LENGTH):
    """Feed `ids` in chunks; return the deltas. The last chunk carries `finish`."""
    deltas, pos = [], 0
    for size in chunk_sizes:
        chunk, pos = ids[pos:pos + size], pos + size
        last = pos >= len(ids)
        deltas.append(detokenize_batch(decoder, [(state, chunk, finish if last else None)])[0])
        if last:
            return deltas
    raise AssertionError("chunk sizes do not cover the ids")


def assert_clean_deltas(deltas, full):
    assert "".join(deltas) == full
    if REPLACEMENT_CHAR not in full:
        assert not any(REPLACEMENT_CHAR in d for d in deltas), deltas


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_matches_full_decode(tokenizer, decoder, text):
    ids = tokenizer.encode(text)
    deltas = stream(decoder, IncrementalDetokenizer(), ids, [1] * len(ids))
    assert_clean_deltas(deltas, tokenizer.decode(ids))
    assert "".join(deltas) == text
    # A character split over tokens is held back: some step emitted nothing.
    if any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids):
        assert "" in deltas[:-1]


def test_random_sequences_and_chunkings(tokenizer, decoder):
    rng = random.Random(0)
    multibyte_ids = sorted({i for t in TEXTS for i in tokenizer.encode(t)})
    for _ in range(150):
        pool = multibyte_ids if rng.random() < 0.7 else range(17, len(tokenizer))
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        sizes = [rng.randint(1, 4) for _ in range(len(ids))]
        deltas = stream(decoder, IncrementalDetokenizer(), ids, sizes)
        assert_clean_deltas(deltas, tokenizer.decode(ids))


def sentencepiece_style_tokenizer():
    """A tiny Llama-style tokenizer: "▁" marks spaces, unknown characters fall back to <0xNN> byte
    tokens, and decoding strips the leading space of the first token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})
    for piece in "▁abcdefghijklmnopqrstuvwxyz":
        vocab[piece] = len(vocab)
    merges = [("▁", "h"), ("e", "l"), ("▁h", "el"), ("l", "o"), ("▁", "w"), ("o", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_tokenizer():
    tokenizer = sentencepiece_style_tokenizer()
    decoder = TokenTextDecoder(tokenizer)
    texts = ["hello 世界 world 😀 dog", "héllo wörld ñ 🇫🇷 中文 end"]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert "<0xF0>" in tokenizer.convert_ids_to_tokens(ids) or "<0xE4>" in tokenizer.convert_ids_to_tokens(ids)
        deltas = stream(decoder, IncrementalDetokenizer(), ids, [1] * len(ids))
        assert_clean_deltas(deltas, text)
    # Random sequences of whole words and characters (invalid UTF-8 is decoded context-dependently
    # by byte fallback, so it is left out), fed in random chunks.
    words = ("hello", "世界", "😀", "wörld", "ñ", "🇫🇷", "dog")
    units = [tokenizer.encode(word, add_special_tokens=False) for word in words]
    rng = random.Random(1)
    for _ in range(100):
        ids = [t for _ in range(rng.randint(1, 8)) for t in rng.choice(units)]
        full = tokenizer.decode(ids)
        assert_clean_deltas(stream(decoder, IncrementalDetokenizer(), ids, [rng.randint(1, 3) for _ in ids]), full)


def test_incomplete_character_is_emitted_at_finish(tokenizer, decoder):
    ids = tokenizer.encode("ok 😀")
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith(REPLACEMENT_CHAR))
    deltas = stream(decoder, IncrementalDetokenizer(), ids[:cut], [1] * cut)
    assert "".join(deltas) == tokenizer.decode(ids[:cut])
    assert deltas[-1].endswith(REPLACEMENT_CHAR)
    assert not any(REPLACEMENT_CHAR in d for d in deltas[:-1])


def test_skip_special_tokens(tokenizer, decoder):
    ids = tokenizer.encode("Hello") + [tokenizer.convert_tokens_to_ids("<|im_end|>")] + tokenizer.encode(" world")
    skipped = stream(decoder, IncrementalDetokenizer(skip_special_tokens=True), ids, [1] * len(ids))
    assert "".join(skipped) == "Hello world"
    kept = stream(decoder, IncrementalDetokenizer(skip_special_tokens=False, spaces_between_special_tokens=False),
                  ids, [1] * len(ids))
    assert "".join(kept) == "Hello<|im_end|> world" == tokenizer.decode(ids, skip_special_tokens=False)


def test_spaces_between_special_tokens(tokenizer, decoder):
    im_start, im_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    ids = tokenizer.encode("Hi") + [im_end, im_start] + tokenizer.encode("there")
    for sizes in ([1] * len(ids), [len(ids)], [2] * len(ids)):
        spaced = stream(decoder, IncrementalDetokenizer(skip_special_tokens=False), ids, sizes)
        assert "".join(spaced) == "Hi <|im_end|> <|im_start|> there"
        tight = stream(decoder, IncrementalDetokenizer(skip_special_tokens=False, spaces_between_special_tokens=False),
                       ids, sizes)
        assert "".join(tight) == "Hi<|im_end|><|im_start|>there"
    # Skipped tokens leave no spaces behind.
    assert "".join(stream(decoder, IncrementalDetokenizer(), ids, [1] * len(ids))) == "Hithere"


def scheduler_stop_index(tokenizer, ids, stop):
    """What the scheduler does: the first step whose decoded output contains a stop string."""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        for s in stop:
            if s in text:
                return n, s
    raise AssertionError("no stop string in the text")


@pytest.mark.parametrize("text,stop,expected", [
    ("The answer is 42.#|# Extra text", ["#|#"], "The answer is 42."),
    ("Counting: one, two, STOP HERE three", ["STOP HERE", "xyzw"], "Counting: one, two, "),
    ("emoji 😀😀 then 🎉 stop", ["😀 then 🎉"], "emoji 😀"),
    ("first<end>second", ["<end>"], "first"),
])
def test_stop_string_trimmed_across_tokens(tokenizer, decoder, text, stop, expected):
    ids = tokenizer.encode(text)
    n, matched = scheduler_stop_index(tokenizer, ids, stop)
    # The stop string starts before the last token, so hold-back is what keeps it out of the stream.
    assert len(tokenizer.decode(ids[:n - 1])) > tokenizer.decode(ids[:n]).find(matched)
    finish = FinishReason(type="stop", matched=matched)
    state = IncrementalDetokenizer.for_request(True, True, False, stop)
    deltas = stream(decoder, state, ids[:n], [1] * n, finish)
    assert "".join(deltas) == expected
    for i in range(1, len(deltas)):  # no prefix of the stream ever ran past the cut
        assert expected.startswith("".join(deltas[:i]))


@pytest.mark.parametrize("text,pattern,expected", [
    ("Total: 1234 apples, then more", r"\d{4} apples", "Total: "),
    ("a line\nQ: next question", r"\nQ:", "a line"),
])
def test_stop_regex_match_trimmed_and_never_streamed(tokenizer, decoder, text, pattern, expected):
    import re

    ids = tokenizer.encode(text)
    n = next(n for n in range(1, len(ids) + 1) if re.search(pattern, tokenizer.decode(ids[:n])))
    matched_text = re.search(pattern, tokenizer.decode(ids[:n])).group(0)
    state = IncrementalDetokenizer.for_request(True, True, False, [], [pattern])
    deltas = stream(decoder, state, ids[:n], [1] * n,
                    FinishReason(type="stop", matched=pattern, matched_text=matched_text))
    assert "".join(deltas) == expected
    for i in range(1, len(deltas)):
        assert expected.startswith("".join(deltas[:i]))


def test_no_stop_trim_keeps_stop_string_and_streams_without_hold(tokenizer, decoder):
    ids = tokenizer.encode("value: 7 END")
    n, matched = scheduler_stop_index(tokenizer, ids, ["END"])
    state = IncrementalDetokenizer.for_request(True, True, True, ["END"])
    deltas = stream(decoder, state, ids[:n], [1] * n, FinishReason(type="stop", matched=matched))
    assert "".join(deltas) == tokenizer.decode(ids[:n]) == "value: 7 END"
    assert all(deltas[:-1])  # ASCII tokens: every step emits text at once


def test_stop_token_id_trimmed_unless_no_stop_trim(tokenizer, decoder):
    ids = tokenizer.encode("a. b.")
    period = ids[-1]
    finish = FinishReason(type="stop", matched=period)
    assert "".join(stream(decoder, IncrementalDetokenizer(), ids, [1] * len(ids), finish)) == "a. b"
    kept = IncrementalDetokenizer(no_stop_trim=True)
    assert "".join(stream(decoder, kept, ids, [1] * len(ids), finish)) == "a. b."


def test_batch_of_requests_with_mixed_flags(tokenizer, decoder):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids_a = tokenizer.encode("中文 ok") + [im_end]
    ids_b = tokenizer.encode("🎉 party")
    a = IncrementalDetokenizer(skip_special_tokens=False)
    b = IncrementalDetokenizer()
    out_a, out_b = [], []
    for i in range(max(len(ids_a), len(ids_b))):
        steps = []
        if i < len(ids_a):
            steps.append((a, ids_a[i:i + 1], LENGTH if i == len(ids_a) - 1 else None))
        if i < len(ids_b):
            steps.append((b, ids_b[i:i + 1], LENGTH if i == len(ids_b) - 1 else None))
        deltas = detokenize_batch(decoder, steps)
        for (state, _, _), delta in zip(steps, deltas):
            (out_a if state is a else out_b).append(delta)
    assert "".join(out_a) == "中文 ok <|im_end|>"
    assert "".join(out_b) == "🎉 party"
