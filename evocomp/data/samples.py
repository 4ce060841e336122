"""A sample, its content-hash id and split, its per-sample seed, and its table row.

A ``Sample`` is one (image, question, answer) triple; its id is a content hash
of the image bytes, the question and the answer, so the same content always has
the same id (the label store and the resumable flows key on it). The split is a
hash of the *image* bytes, so all questions on one image land in the same split
and a grown dataset never moves an old sample to another split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from evocomp.errors import DatasetError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path  # absolute path
    question: str
    answer: str
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def load_image(self) -> Image.Image:
        return load_image(self.image)


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB, with an error that names the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"corrupt or unreadable image {path}: {err}") from None


def sample_id(image_bytes: bytes, question: str, answer: str) -> str:
    h = hashlib.sha256(image_bytes)
    h.update(b"\0" + question.encode() + b"\0" + answer.encode())
    return h.hexdigest()[:32]


def assign_split(image_bytes: bytes, val_fraction: float, test_fraction: float) -> str:
    u = int(hashlib.sha256(image_bytes).hexdigest()[:8], 16) / 0xFFFFFFFF
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def sample_seed(global_seed: int, sample_id: str) -> int:
    """Per-sample seed from a stable hash (Python's ``hash()`` varies per process)."""
    digest = hashlib.blake2b(f"{global_seed}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: fits torch / numpy seeds


def portable_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it, else absolute:
    a checkout moved elsewhere still finds its images."""
    path, cwd = Path(path).resolve(), Path.cwd().resolve()
    return str(path.relative_to(cwd) if path.is_relative_to(cwd) else path)


def to_row(s: Sample) -> dict[str, Any]:
    """A sample as a table row (the prepared Parquet table, the store's samples table).

    ``meta`` is a JSON-safe dict (values JSON cannot hold become strings).
    """
    return {
        "id": s.id,
        "split": s.split,
        "qtype": s.meta.get("qtype"),
        "question": s.question,
        "answer": s.answer,
        "image": portable_path(s.image),
        "meta": json.loads(json.dumps(s.meta, default=str)),
    }
