"""Reading a token frame, the binary reply to `getData` with tokens on the wire (docs/PROTOCOL.md
§3.11): magic, the JSON header's length, the header, then the token ids of every sample."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from streamgpt.wire import TOKEN_DTYPES, TOKEN_FRAME_MAGIC

_FIXED = len(TOKEN_FRAME_MAGIC) + 4  # magic, then the header's length as a little-endian u32


class FrameError(ValueError):
    """A binary frame that is not a well-formed token frame; the message says what is wrong."""


@dataclass
class TokenFrame:
    ids: list[str]  # sample ids
    tokens: list[np.ndarray]  # each sample's token ids (views into the frame)
    cursor: dict[str, Any] | None


def read_frame(frame: bytes) -> TokenFrame:
    """The frame's samples and cursor; FrameError, saying what is wrong, for anything else."""
    if len(frame) < _FIXED:
        raise FrameError(f"truncated: {len(frame)} bytes, short of its {_FIXED}-byte fixed part")
    if frame[:4] != TOKEN_FRAME_MAGIC:
        raise FrameError(f"bad magic {bytes(frame[:4])!r}, expected {TOKEN_FRAME_MAGIC!r}")
    (size,) = struct.unpack_from("<I", frame, 4)
    if size > len(frame) - _FIXED:
        raise FrameError(
            f"truncated: its JSON header is announced as {size} bytes, only "
            f"{len(frame) - _FIXED} bytes follow"
        )
    try:
        header = orjson.loads(frame[_FIXED : _FIXED + size])
    except orjson.JSONDecodeError as e:
        raise FrameError(f"its header is not JSON ({e})") from None
    ids, lengths, dtype = _fields(header)
    itemsize = np.dtype(TOKEN_DTYPES[dtype]).itemsize
    total, body = sum(lengths), len(frame) - _FIXED - size
    if total * itemsize != body:
        raise FrameError(
            f"wrong lengths: header.lengths add up to {total} {dtype} tokens ({total * itemsize} "
            f"bytes), but {body} bytes of tokens follow the header"
        )
    tokens = np.frombuffer(frame, TOKEN_DTYPES[dtype], total, _FIXED + size)
    return TokenFrame(ids, np.split(tokens, np.cumsum(lengths)[:-1]), header["cursor"])


def _fields(header: Any) -> tuple[list[str], list[int], str]:
    """The header's sample ids, lengths and dtype, checked against each other."""
    if not isinstance(header, dict):
        raise FrameError("its header is not a JSON object")
    ids, lengths, dtype = header.get("ids"), header.get("lengths"), header.get("dtype")
    if not isinstance(dtype, str) or dtype not in TOKEN_DTYPES:
        raise FrameError(f"dtype {str(dtype)[:40]!r} is not one of {sorted(TOKEN_DTYPES)}")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise FrameError("header.ids is not a list of sample id strings (at least one)")
    if (
        not isinstance(lengths, list)
        or len(lengths) != len(ids)
        or not all(type(n) is int and n >= 0 for n in lengths)
    ):
        raise FrameError(
            f"wrong lengths: header.lengths must hold one count >= 0 per sample id ({len(ids)}), "
            f"got {str(lengths)[:80]}"
        )
    # A reconnect resumes from the cursor: one that is not the server's would repeat or skip.
    if not isinstance(header.get("cursor"), dict):
        raise FrameError(f"header.cursor is not a JSON object: {str(header.get('cursor'))[:80]}")
    return ids, lengths, dtype
