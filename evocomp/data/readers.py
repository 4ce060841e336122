"""Dataset readers: the LLaVA instruction format, JSONL, or a folder with dataset.json.

Each record becomes :class:`~evocomp.data.samples.Sample` objects (one per question turn).
Errors a user can cause name the file, the record and what was expected.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from evocomp.data.samples import Sample, assign_split, sample_id
from evocomp.errors import DatasetError

IMAGE_TOKEN = "<image>"


def _resolve_image(root: Path, rel: Any, where: str) -> tuple[Path, bytes]:
    if not isinstance(rel, str) or not rel:
        raise DatasetError(f"{where}: 'image' must be a non-empty path, got {rel!r}")
    root = root.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise DatasetError(
            f"{where}: image path {rel!r} escapes the dataset folder {root}; refused"
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{where}: image not found: {path}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as err:  # PIL raises many types for bad bytes
        raise DatasetError(f"{where}: corrupt or unreadable image {path}: {err}") from None
    return path, data


def _check_text(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: empty or missing {what}")
    return value.strip()


def read_llava(
    path: str | Path,
    images_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.15,
) -> list[Sample]:
    """Read a LLaVA instruction JSON (a list of conversations); one sample per turn."""
    path = Path(path)
    root = Path(images_dir) if images_dir else path.parent
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"dataset file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(records, list):
        raise DatasetError(f"{path}: expected a JSON list of conversations")
    samples: list[Sample] = []
    for n, rec in enumerate(records):
        where = f"{path} record {n} (id {rec.get('id', '?') if isinstance(rec, dict) else '?'})"
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            raise DatasetError(f"{where}: expected an object with a 'conversations' list")
        img_path, data = _resolve_image(root, rec.get("image"), where)
        split = assign_split(data, val_fraction, test_fraction)
        conv = rec["conversations"]
        if not conv or IMAGE_TOKEN not in str(conv[0].get("value", "")):
            raise DatasetError(f"{where}: the first human turn has no {IMAGE_TOKEN} token")
        meta = rec.get("metadata") or {}
        turns_meta = meta.get("turns") or []
        pairs = [
            (conv[i], conv[i + 1] if i + 1 < len(conv) else None) for i in range(0, len(conv), 2)
        ]
        for t, (human, gpt) in enumerate(pairs):
            if human.get("from") != "human":
                raise DatasetError(
                    f"{where} turn {t}: expected a 'human' turn, got {human.get('from')!r}"
                )
            if gpt is None or gpt.get("from") != "gpt":
                raise DatasetError(f"{where} turn {t}: the question has no 'gpt' answer")
            question = _check_text(
                str(human.get("value", "")).replace(IMAGE_TOKEN, ""),
                "question",
                f"{where} turn {t}",
            )
            answer = _check_text(gpt.get("value"), "answer", f"{where} turn {t}")
            m = {k: v for k, v in meta.items() if k != "turns"}
            if t < len(turns_meta):
                m.update(turns_meta[t])
            m["source_id"], m["turn"], m["image_rel"] = rec.get("id"), t, rec["image"]
            samples.append(
                Sample(sample_id(data, question, answer), img_path, question, answer, split, m)
            )
    return samples


def read_jsonl(
    path: str | Path,
    images_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.15,
) -> list[Sample]:
    """Read JSONL lines of ``{"image", "question", "answer"}`` (extra keys go to metadata)."""
    path = Path(path)
    root = Path(images_dir) if images_dir else path.parent
    if not path.exists():
        raise DatasetError(f"dataset file not found: {path}")
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{where}: not valid JSON: {err}") from None
        img_path, data = _resolve_image(root, rec.get("image"), where)
        question = _check_text(
            str(rec.get("question", "")).replace(IMAGE_TOKEN, ""), "question", where
        )
        answer = _check_text(rec.get("answer"), "answer", where)
        meta = {k: v for k, v in rec.items() if k not in ("image", "question", "answer")}
        meta["image_rel"] = rec["image"]
        split = assign_split(data, val_fraction, test_fraction)
        samples.append(
            Sample(sample_id(data, question, answer), img_path, question, answer, split, meta)
        )
    return samples


def read_dataset(
    path: str | Path,
    images_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.15,
) -> list[Sample]:
    """Read a dataset by extension (.json: LLaVA format; .jsonl: one sample a line)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    if path.is_dir():
        path = path / "dataset.json"
        if not path.exists():
            raise DatasetError(f"{path.parent} is a folder without a dataset.json")
    reader = read_jsonl if path.suffix == ".jsonl" else read_llava
    samples = reader(path, images_dir, val_fraction, test_fraction)
    if not samples:
        raise DatasetError(f"{path}: no samples in the dataset (nothing to prepare)")
    seen: set[str] = set()
    return [s for s in samples if not (s.id in seen or seen.add(s.id))]
