"""Load the MLLM adapter for a local checkpoint directory (the one place that picks it).

mllm = load_mllm("models/mllm", device="cuda", dtype="bfloat16")
"""

from __future__ import annotations

from pathlib import Path

from evocomp.mllm.base import MLLM


def load_mllm(path: str | Path, device: str = "cpu", dtype: str = "float32") -> MLLM:
    """The adapter for the checkpoint at ``path`` (today: ``LlavaForConditionalGeneration``).

    Raises:
        ModelError: not a checkpoint directory, an unsupported family or an unknown dtype.
    """
    from evocomp.mllm.hf_llava import HFLlava

    return HFLlava(path, device=device, dtype=dtype)
