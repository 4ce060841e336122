"""Held-out variants of the built-in benchmarks: the backgrounds an image can be drawn on, and
the object-count range.

Held-out variants (``evocomp synth --background noise --objects 2-4``) draw scenes from the
same generator under another background or object count; with the same seed and object
range a background variant holds the very same objects and questions, so a change in
accuracy is the background's alone.

- ``plain``: one flat grey (shapes-vqa's own: 235; scenes-vqa: 180, its texture's mean).
- ``noise``: that grey plus independent pixel noise of +-14 per pixel.
- ``texture``: grey blotches about two patches across (140-220), the same pixel noise and a
  faint per-image tint (scenes-vqa's own).
"""

from __future__ import annotations

import random

from PIL import Image, ImageChops

STYLES = ("plain", "noise", "texture")
NOISE = 14  # +- grey levels of pixel noise (noise, texture)


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown background {style!r}; expected one of {', '.join(STYLES)}")
    return style


def check_objects(objects: tuple[int, int], most: int, benchmark: str) -> tuple[int, int]:
    """``(min, max)`` objects per image, 1 <= min <= max <= ``most``; ValueError naming it."""
    lo, hi = objects
    if not 1 <= lo <= hi <= most:
        raise ValueError(
            f"{benchmark}-vqa objects per image (--objects, prepare.objects) must be MIN-MAX "
            f"with 1 <= MIN <= MAX <= {most}, got {lo}-{hi}"
        )
    return lo, hi


def parse_objects(text: str) -> tuple[int, int]:
    """``"2-4"`` -> (2, 4); ``"5"`` -> (5, 5); ValueError naming the text."""
    parts = text.split("-")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--objects must be MIN-MAX or N (e.g. 2-4), got {text!r}")
    lo, hi = int(parts[0]), int(parts[-1])
    return lo, hi


def draw(style: str, size: int, seed: int, grey: int) -> Image.Image:
    """A ``size`` x ``size`` RGB background in ``style``, deterministic by ``seed``."""
    check_style(style)
    if style == "plain":
        return Image.new("RGB", (size, size), (grey, grey, grey))
    rng = random.Random(seed)
    if style == "noise":
        return Image.merge("RGB", [_noisy(Image.new("L", (size, size), grey), rng)] * 3)
    k = size // 32 + 2  # blotches about two 16-px patches across
    low = Image.frombytes("L", (k, k), rng.randbytes(k * k))
    low = low.resize((size, size), Image.Resampling.BICUBIC).point(lambda v: 140 + v * 80 // 255)
    tone = _noisy(low, rng)
    tint = [rng.randint(-8, 8) for _ in range(3)]
    return Image.merge("RGB", [tone.point(lambda v, d=d: min(255, max(0, v + d))) for d in tint])


def _noisy(tone: Image.Image, rng: random.Random) -> Image.Image:
    """``tone`` (grey, L) plus independent pixel noise of +-``NOISE``."""
    size = tone.size
    fine = Image.frombytes("L", size, rng.randbytes(size[0] * size[1]))
    return ImageChops.add(tone, fine.point(lambda v: v * 2 * NOISE // 255), offset=-NOISE)


def training_mix(styles: list[str] | None, n: int, seed: int, own: str) -> list[tuple[str, int]]:
    """Per training image, ``(style, noise seed)`` drawn uniformly from ``styles`` (None: the
    benchmark's ``own`` background for every image). A stream of its own, so the scenes a
    reference model trains on are the same whatever the mix."""
    if not styles:
        return [(own, 0)] * n
    for style in styles:
        check_style(style)
    rng = random.Random(f"backgrounds-{seed}")
    return [(rng.choice(styles), rng.getrandbits(32)) for _ in range(n)]
