"""A sample, its content-hash id and split, its per-sample seed, and its table row.

A ``Sample`` is one (image, question, answer) triple; its id is a content hash
of the image bytes, the question and the answer, so the same content always has
the same id (the label store and the resumable flows key on it). The split is a
hash of the *image* bytes, so all questions on one image land in the same split
and a grown dataset never moves an old sample to another split. The same holds for the
train split's *selection share* (:func:`held_for_selection`): the images a compressor
training leaves out so that ``evaluate.choose: select_answer_loss`` can compare compressors
on samples none of them was fitted or early-stopped on.
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


def held_for_selection(image_bytes: bytes, share: float) -> bool:
    """Whether a train-split image is in the selection share (``train.select_share``).

    Its own salted hash, so the share is drawn independently of :func:`assign_split`'s
    draw (which put the image in train) and stays put when the dataset grows."""
    if share <= 0:
        return False
    u = int(hashlib.sha256(b"select\0" + image_bytes).hexdigest()[:8], 16) / 0xFFFFFFFF
    return u < share


def selection_share(samples, share: float) -> list:
    """The train-split ``samples`` (anything with ``.image``, a path, and ``.split``) whose
    image is in the selection share, in their order. Each image is read once, and none
    without a share."""
    if share <= 0:
        return []
    held: dict[Path, bool] = {}
    out = []
    for s in samples:
        if s.split != "train":
            continue
        path = Path(s.image)
        if path not in held:
            try:
                held[path] = held_for_selection(path.read_bytes(), share)
            except FileNotFoundError:
                raise DatasetError(f"image not found: {path}") from None
        if held[path]:
            out.append(s)
    return out


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
