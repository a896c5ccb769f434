"""Write the demo job's short WAV files (tones and noise; seconds, not minutes).

Run once: python jobs/demo/make_audio.py — the files are also committed.
"""

from __future__ import annotations

import math
import random
import struct
import wave
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATE = 8000


def tone(path: Path, seconds: float, freq: float, noise: float, seed: int) -> None:
    rng = random.Random(seed)
    frames = bytearray()
    for i in range(int(seconds * RATE)):
        value = 0.4 * math.sin(2 * math.pi * freq * i / RATE) + noise * rng.uniform(-1, 1)
        frames += struct.pack("<h", int(max(-1.0, min(1.0, value)) * 32767))
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(bytes(frames))


def main() -> None:
    tone(HERE / "audio/interviews/take1.wav", 1.0, 220.0, 0.20, 1)
    tone(HERE / "audio/interviews/take2.wav", 1.5, 330.0, 0.25, 2)
    tone(HERE / "audio/music/bars.wav", 2.0, 440.0, 0.10, 3)


if __name__ == "__main__":
    main()
