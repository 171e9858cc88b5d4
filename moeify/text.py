"""User text files (calibration, verify, training data): refused when they are not text.

--text and --calibration may name any file: a 2 GB dump, a checkpoint, an image. Only the prefix
a caller can use is read, never more than MAX_BYTES, and bytes that do not look like text are
refused in one line before a tokenizer sees them (a tokenizer given a 2 GB file took 4-9 GB).
Training data is read whole (read_whole), with the same check.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from moeify.errors import MoeifyError

MAX_BYTES = 64 * 2**20  # the most read of any one file, whatever a caller asks for
UTF8_WIDTH = 4  # bytes of UTF-8's widest character: a prefix of chars * 4 bytes holds `chars` characters
BAD_SHARE = 0.005  # undecodable bytes tolerated, as a share of bytes (a stray Latin-1 byte in UTF-8 prose)
CONTROL_SHARE = 0.1  # control bytes tolerated besides whitespace (terminal colour codes in a log)
_WHITESPACE = b"\t\n\v\f\r"
_NOT_CONTROL = bytes(b for b in range(256) if b >= 32 and b != 127 or b in _WHITESPACE)


@dataclass
class _Sniff:
    """Counts over the bytes read so far: enough to tell text from binary."""

    size: int = 0
    nul: bool = False
    bad: int = 0  # bytes UTF-8 could not decode
    control: int = 0  # control bytes other than whitespace

    def add(self, raw: bytes, text: str) -> None:
        """raw: bytes read; text: them decoded with errors="replace"."""
        self.size += len(raw)
        self.nul = self.nul or b"\0" in raw
        self.bad += text.count("\ufffd") - raw.count("\ufffd".encode())  # a real U+FFFD is text
        self.control += len(raw.translate(None, _NOT_CONTROL))

    def check(self, path: Path, flag: str) -> None:
        reason = ("it contains NUL bytes" if self.nul
                  else "it is not UTF-8" if self.bad > BAD_SHARE * self.size
                  else "it is full of control characters" if self.control > CONTROL_SHARE * self.size else None)
        if reason:
            raise MoeifyError(f"{path} is not a text file ({reason}); pass a UTF-8 text file to {flag}")


def read_plain(path: Path, flag: str, chars: int | None = None) -> str:
    """The first `chars` characters of a UTF-8 text file (all of it up to MAX_BYTES when None).

    flag: the option that named the file, for the error line.
    """
    limit = MAX_BYTES if chars is None else min(MAX_BYTES, max(chars, 0) * UTF8_WIDTH)  # f.read(-1) reads all
    with open(path, "rb") as f:
        raw = f.read(limit)
        whole = not f.read(1)
    text = _text(raw, path, flag, final=whole)
    return text if chars is None else text[:chars]


def read_whole(path: Path, flag: str) -> str:
    """All of a UTF-8 text file, refused as read_plain refuses a prefix that is not text. For training
    data, which is meant to be large and is tokenised whole: no MAX_BYTES."""
    return _text(Path(path).read_bytes(), path, flag, final=True)


def _text(raw: bytes, path: Path, flag: str, final: bool) -> str:
    """raw decoded, refused in one line when it does not look like text. Not final: a character cut
    at the end of a prefix is left out, not counted as undecodable."""
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(raw, final=final)
    sniff = _Sniff()
    sniff.add(raw, text)
    sniff.check(path, flag)
    return text


def read_jsonl(path: Path, flag: str, chars: int | None = None) -> list[str]:
    """The "text" field of each line of a JSONL file, streamed until `chars` characters in all.

    Reading stops after MAX_BYTES whatever `chars` is; blank lines are skipped.
    """
    texts: list[str] = []
    got, sniff = 0, _Sniff()
    with open(path, "rb") as f:
        for number, raw in enumerate(_lines(f, path), 1):
            line = raw.decode("utf-8", "replace")
            sniff.add(raw, line)
            if not line.strip():
                continue
            try:
                text = str(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError, RecursionError):
                sniff.check(path, flag)  # a binary file is named as such, not blamed for its JSON
                raise MoeifyError(f"{path} line {number} is not a JSON object with a \"text\" field") from None
            texts.append(text if chars is None else text[: chars - got])
            got += len(texts[-1])
            if chars is not None and got >= chars:
                break
    sniff.check(path, flag)
    return texts


def _lines(f: BinaryIO, path: Path) -> Iterator[bytes]:
    """Whole lines of f until MAX_BYTES have been read; a line cut by that limit is left out."""
    left, first = MAX_BYTES, True
    while line := f.readline(left):
        left -= len(line)
        if left == 0 and not line.endswith(b"\n") and f.read(1):  # cut by the limit, not by the file's end
            if first:
                raise MoeifyError(f"{path} line 1 is over {MAX_BYTES // 2**20} MiB; put one document per line")
            return
        yield line
        first = False
