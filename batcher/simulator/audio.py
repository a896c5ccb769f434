"""What the simulator knows about audio: a WAV's length and the fake restoration.

The "restored" file is a pure function of the input bytes so that a test can
tell, from an output file alone, which input produced it.
"""

from __future__ import annotations

import hashlib
import io
import struct
import wave

__all__ = [
    "RESTORED_MAGIC",
    "project_source_bytes",
    "restored_audio",
    "restored_source_digest",
    "wav_duration_seconds",
]

# An ID3v2.4 header with an empty tag, then an MPEG-1 layer III frame sync, so
# tools that sniff the first bytes call the payload audio/mpeg.
_ID3_HEADER = b"ID3\x04\x00\x00\x00\x00\x00\x00"
_FRAME_SYNC = b"\xff\xfb\x90\x00"
RESTORED_MAGIC = _ID3_HEADER + _FRAME_SYNC + b"DIFFIO-SIM-RESTORED\n"
_XOR_TABLE = bytes(b ^ 0x5A for b in range(256))


def restored_audio(original: bytes) -> bytes:
    """The simulator's deterministic "restoration" of ``original``.

    Layout: :data:`RESTORED_MAGIC`, the sha256 hex of ``original`` and a
    newline, then ``original`` reversed with every byte XORed with 0x5A (so
    the size follows the input and no input byte is passed through as is).
    """
    digest = hashlib.sha256(original).hexdigest().encode("ascii")
    return RESTORED_MAGIC + digest + b"\n" + original[::-1].translate(_XOR_TABLE)


def restored_source_digest(restored: bytes) -> str | None:
    """The sha256 hex of the input a :func:`restored_audio` output came from."""
    if not restored.startswith(RESTORED_MAGIC):
        return None
    digest = restored[len(RESTORED_MAGIC) : len(RESTORED_MAGIC) + 64]
    try:
        return digest.decode("ascii")
    except UnicodeDecodeError:
        return None


def project_source_bytes(api_project_id: str) -> bytes:
    """Stand-in input for a project with no upload (given or auto-created)."""
    return b"diffio-sim-project:" + api_project_id.encode("utf-8")


def wav_duration_seconds(data: bytes) -> float | None:
    """Seconds of audio in a WAV file, or None when ``data`` is not a readable WAV."""
    try:
        with wave.open(io.BytesIO(data), "rb") as reader:
            rate = reader.getframerate()
            return reader.getnframes() / rate if rate > 0 else None
    except (wave.Error, EOFError, struct.error, ValueError):
        # Python 3.11's wave refuses WAVE_FORMAT_EXTENSIBLE and float WAVs;
        # a plain RIFF walk still knows their length.
        return _riff_duration(data)


def _riff_duration(data: bytes) -> float | None:
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    byte_rate: int | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk_id == b"fmt " and size >= 16 and body + 16 <= len(data):
            byte_rate = int.from_bytes(data[body + 8 : body + 12], "little")
        elif chunk_id == b"data":
            if not byte_rate:
                return None
            available = min(size, len(data) - body)
            return float(available / byte_rate)
        pos = body + size + (size & 1)  # chunks are word-aligned
    return None
