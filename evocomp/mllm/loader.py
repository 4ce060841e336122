"""Load the MLLM adapter for a local checkpoint directory (the one place that picks it).

mllm = load_mllm("models/mllm", device="cuda", dtype="bfloat16")
mllm = load_mllm("ckpt/qwen2-vl", prompt_template="<|im_start|>user\\n<image>{question}...")

The family is config.json's ``model_type`` (:data:`evocomp.mllm.checkpoint.FAMILIES`): one
adapter class per family.
"""

from __future__ import annotations

from pathlib import Path

from evocomp.mllm.base import MLLM
from evocomp.mllm.checkpoint import check_checkpoint


def load_mllm(
    path: str | Path,
    device: str = "cpu",
    dtype: str = "float32",
    prompt_template: str | None = None,
) -> MLLM:
    """The adapter for the checkpoint at ``path``.

    ``prompt_template`` (``mllm.prompt_template``) overrides the prompt the checkpoint's chat
    template gives (:mod:`evocomp.mllm.prompts`); it is part of the model id.

    Raises:
        ModelError: not a checkpoint directory, an unsupported family or an unknown dtype.
    """
    family = check_checkpoint(path)["model_type"]
    # Imported here, so a run imports its own family's adapter only.
    if family == "llava":
        from evocomp.mllm.hf_llava import HFLlava as Adapter
    elif family == "qwen2_vl":
        from evocomp.mllm.hf_qwen_vl import HFQwenVL as Adapter
    elif family == "qwen3_vl":
        from evocomp.mllm.hf_qwen_vl import HFQwen3VL as Adapter
    elif family == "gemma3":
        from evocomp.mllm.hf_gemma3 import HFGemma3 as Adapter
    elif family == "llava_next":
        from evocomp.mllm.hf_llava_next import HFLlavaNext as Adapter
    elif family == "llava_onevision":
        from evocomp.mllm.hf_llava_next import HFLlavaOnevision as Adapter
    else:  # check_checkpoint admits only FAMILIES
        from evocomp.mllm.hf_qwen_vl import HFQwen25VL as Adapter
    return Adapter(path, device=device, dtype=dtype, prompt_template=prompt_template)
