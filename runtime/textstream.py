"""Token ids to text as they decode: incremental detokenization and stop strings.

`Detokenizer` turns each new id into the text it adds, never splitting a multi-byte character that
byte-level or byte-fallback tokens spell over several ids, and keeping the spaces the tokenizer's decoder
gives (a SentencePiece decoder drops the leading space of the first token it sees, so every piece is
decoded with the previous piece's tokens as left context and only the new part kept). `StopText` cuts
the text at the first stop string and holds back any tail that may still become one, so a stream never
shows a stop string or its start.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"  # what a decoder gives for the bytes of an unfinished character


class Detokenizer:
    """Incremental decoding of one sequence of generated ids with a `tokenizers.Tokenizer`.

    `add(id)` returns the text that id completes ('' while a character is still unfinished); the pieces
    concatenate to `tokenizer.decode(ids, skip_special_tokens=True)`.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] is the context already shown
        self._read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        shown = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) <= len(shown) or text.endswith(REPLACEMENT):
            return ""  # nothing new yet, or a character whose remaining bytes are still to come
        # the ids shown last become the next context: they start after a whole character, so their bytes never
        # join an earlier character's tail into one undecodable run
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(shown):]

    def flush(self) -> str:
        """What is left at the end (an unfinished character decodes as U+FFFD, as `decode` gives it)."""
        shown = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._read = len(self.ids)
        return text[len(shown):] if len(text) > len(shown) else ""


class StopText:
    """Text released for output, held back where it might be the start of a stop string.

    `push(piece)` returns the text now safe to show; `stopped` turns true once a stop string appears (the
    text before it is released, the stop string and everything after it never are).
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)]
        keep = self._partial(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def _partial(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """The held-back tail, released when generation ends without the stop string completing."""
        text, self._held = ("" if self.stopped else self._held), ""
        return text
