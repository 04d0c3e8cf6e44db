"""A small built-in tokenizer for offline runs (the synthetic benchmark, tests).

Word-level for a fixed vocabulary (the synthetic benchmark's words), UTF-8 byte
fallback for anything else, so it encodes any text and round-trips it up to
whitespace normalisation. It implements the subset of the Hugging Face tokenizer
interface the trainer uses (``pad_token_id``, ``eos_token_id``, ``bos_token_id``,
``encode``, ``decode``, ``len()``); real models use their own tokenizer
(``AutoTokenizer.from_pretrained``).
"""

from __future__ import annotations

from typing import Iterable, Sequence

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
_NUM_BYTES = 256


class BuiltinTokenizer:
    """Word vocabulary + byte fallback. Ids: specials, then 256 bytes, then the words."""

    def __init__(self, words: Iterable[str] = ()) -> None:
        self.words: list[str] = []
        seen = set()
        for w in words:
            if not w or any(c.isspace() for c in w):
                raise ValueError(f"vocabulary word {w!r} must be non-empty and contain no whitespace")
            if w not in seen:
                seen.add(w)
                self.words.append(w)
        self._offset = len(SPECIAL_TOKENS) + _NUM_BYTES
        self._word_id = {w: self._offset + i for i, w in enumerate(self.words)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = range(len(SPECIAL_TOKENS))
        self.padding_side = "right"

    def __len__(self) -> int:
        return self._offset + len(self.words)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (a leading ``<bos>`` when ``add_special_tokens``)."""
        ids = [self.bos_token_id] if add_special_tokens else []
        for i, chunk in enumerate(text.split()):
            wid = self._word_id.get(chunk)
            if wid is not None:
                ids.append(wid)
            else:
                raw = ((" " if i else "") + chunk).encode("utf-8")
                ids.extend(len(SPECIAL_TOKENS) + b for b in raw)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        buf = bytearray()

        def flush() -> None:
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()

        for t in ids:
            t = int(t)
            if t < len(SPECIAL_TOKENS):
                if not skip_special_tokens:
                    flush()
                    out.append(SPECIAL_TOKENS[t])
            elif t < self._offset:
                buf.append(t - len(SPECIAL_TOKENS))
            elif t < len(self):
                flush()
                out.append((" " if out else "") + self.words[t - self._offset])
            else:
                raise ValueError(f"token id {t} is outside the vocabulary (size {len(self)})")
        flush()
        return "".join(out)
