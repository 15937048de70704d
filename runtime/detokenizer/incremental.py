"""Token ids to text, incrementally, one request at a time (the prefix-offset / read-offset method).

Decoding a token alone is wrong in two ways: a byte-level BPE token may hold only part of a UTF-8
character, and some tokenizers (SentencePiece) drop a word's leading space at the start of a decode.
So each step decodes a short window twice: `ids[prefix_offset:read_offset]` (text already emitted)
and `ids[prefix_offset:]`; the new text is the difference. When the difference ends in U+FFFD the
last character is still incomplete: nothing is emitted and the ids wait for the next step. Both
offsets only move to positions where the text ended on a whole character.

Stop strings: the scheduler ends a request on the token that completes a stop string and reports the
string in FinishReason.matched; the text from its first occurrence on is cut (unless no_stop_trim).
Since that occurrence may begin several tokens earlier, a request with stop strings keeps its last
(longest stop string - 1) characters back until the next step or the finish. stop_regex patterns work
alike: the scheduler reports the text the pattern matched (FinishReason.matched_text), which is cut,
and the hold-back covers the widest match (runtime/stop_regex.py).

All requests of one TokenUpdates message are decoded in one batched call (`detokenize_batch`)."""

from __future__ import annotations

from dataclasses import dataclass

from runtime import stop_regex
from runtime.messages import FinishReason

REPLACEMENT_CHAR = "\ufffd"


class TokenTextDecoder:
    """Decodes lists of ids like `tokenizer.decode`, in batches, through the Rust backend when the
    tokenizer has one and does no clean-up pass of its own.

    spaces_between_special_tokens: added tokens that are kept in the text are joined to the text
    around them, and to each other, with a space ("a <|im_end|> b"), as HF's Python tokenizers do.
    HF's fast tokenizers ignore the flag, so it is implemented here."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleans_up = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self.backend = backend if backend is not None and not cleans_up else None
        added = tokenizer.added_tokens_decoder  # id -> AddedToken
        self.added_text = {token_id: token.content for token_id, token in added.items()}
        self.added_ids = set(self.added_text)
        special = {token_id for token_id, token in added.items() if token.special} | set(tokenizer.all_special_ids)
        # Added tokens that survive skip_special_tokens=True, so still need spaces around them.
        self.kept_when_skipping = {token_id for token_id in self.added_text if token_id not in special}
        self.special = special

    def decode_batch(self, sequences: list[list[int]], skip_special_tokens: bool,
                     spaces_between_special_tokens: bool) -> list[str]:
        if not spaces_between_special_tokens:
            return self._decode_plain(sequences, skip_special_tokens)
        spaced = self.kept_when_skipping if skip_special_tokens else self.added_ids
        texts = self._decode_plain(sequences, skip_special_tokens)
        for i, ids in enumerate(sequences):
            if not spaced.isdisjoint(ids):
                texts[i] = self._decode_spaced(ids, skip_special_tokens, spaced)
        return texts

    def _decode_plain(self, sequences: list[list[int]], skip_special_tokens: bool) -> list[str]:
        if self.backend is not None:
            return self.backend.decode_batch(sequences, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens,
                                           spaces_between_special_tokens=False)

    def _decode_spaced(self, ids: list[int], skip_special_tokens: bool, spaced: set[int]) -> str:
        pieces: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in spaced:
                if run:
                    pieces.append(run)
                    run = []
                pieces.append(self.added_text[token_id])
            elif not (skip_special_tokens and token_id in self.special):
                run.append(token_id)
        if run:
            pieces.append(run)
        runs = [piece for piece in pieces if isinstance(piece, list)]
        decoded = iter(self._decode_plain(runs, skip_special_tokens))
        return " ".join(piece if isinstance(piece, str) else next(decoded) for piece in pieces)


@dataclass
class IncrementalDetokenizer:
    """The decoding state of one request."""

    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    stop_hold_chars: int = 0  # longest stop string - 1; 0 without stop strings or with no_stop_trim

    def __post_init__(self):
        self.ids: list[int] = []  # ids that make up the text (a trimmed stop token is left out)
        self.prefix_offset = 0
        self.read_offset = 0
        self.held = ""  # decoded but not yet emitted (stop-string hold-back)

    @classmethod
    def for_request(cls, skip_special_tokens: bool, spaces_between_special_tokens: bool, no_stop_trim: bool,
                    stop: list[str], stop_patterns: list[str] = ()) -> IncrementalDetokenizer:
        longest = max([len(s) for s in stop] + [stop_regex.window(list(stop_patterns))])
        hold = 0 if no_stop_trim or longest == 0 else longest - 1
        return cls(skip_special_tokens, spaces_between_special_tokens, no_stop_trim, hold)

    def windows(self, new_ids: list[int], finish: FinishReason | None) -> tuple[list[int], list[int]]:
        """Take the step's new ids; return the two windows to decode (emitted part, everything)."""
        if (finish is not None and finish.type == "stop" and isinstance(finish.matched, int)
                and not self.no_stop_trim and new_ids and new_ids[-1] == finish.matched):
            new_ids = new_ids[:-1]  # a matched stop token is not part of the text
        self.ids.extend(new_ids)
        return self.ids[self.prefix_offset:self.read_offset], self.ids[self.prefix_offset:]

    def text_delta(self, prefix_text: str, full_text: str, finish: FinishReason | None) -> str:
        """Given the decoded windows, advance and return the text to emit now."""
        if len(full_text) > len(prefix_text) and (finish is not None or not full_text.endswith(REPLACEMENT_CHAR)):
            self.held += full_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        if finish is not None:
            text, self.held = self._trim_stop(self.held, finish), ""
            return text
        cut = len(self.held) - self.stop_hold_chars
        if cut <= 0:
            return ""
        text, self.held = self.held[:cut], self.held[cut:]
        return text

    def _trim_stop(self, text: str, finish: FinishReason) -> str:
        if finish.type != "stop" or not isinstance(finish.matched, str) or self.no_stop_trim:
            return text
        # The occurrence the scheduler stopped at is the first one not yet emitted: the hold-back
        # kept enough characters for it to start inside `text`.
        index = text.find(finish.matched if finish.matched_text is None else finish.matched_text)
        return text if index < 0 else text[:index]


def detokenize_batch(decoder: TokenTextDecoder,
                     steps: list[tuple[IncrementalDetokenizer, list[int], FinishReason | None]]) -> list[str]:
    """One decoding step for several requests: the text delta of each, in order. Requests are grouped
    by their decode flags so each group is one batched decode call."""
    groups: dict[tuple[bool, bool], list[int]] = {}
    windows: list[list[int]] = []
    for i, (state, new_ids, finish) in enumerate(steps):
        windows.extend(state.windows(new_ids, finish))
        groups.setdefault((state.skip_special_tokens, state.spaces_between_special_tokens), []).append(i)
    texts: list[str] = [""] * len(windows)
    for (skip, spaces), members in groups.items():
        sequences = [windows[2 * i + k] for i in members for k in (0, 1)]
        for j, text in enumerate(decoder.decode_batch(sequences, skip, spaces)):
            texts[2 * members[j // 2] + j % 2] = text
    return [state.text_delta(texts[2 * i], texts[2 * i + 1], finish)
            for i, (state, _, finish) in enumerate(steps)]
