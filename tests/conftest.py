"""Test environment: offline, project-local Prefect home, robust Prefect settings."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set before anything imports transformers or prefect.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_HOME", str(Path(tempfile.gettempdir()) / "evocomp-test-prefect"))
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.pop("EVOCOMP_DB_URL", None) if os.environ.get("CI") else None

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def make_tiny_llava(
    path: Path, image_size: int = 96, patch: int = 16, hidden: int = 64, seed: int = 0
) -> Path:
    """A random LlavaForConditionalGeneration built from configs and saved like a downloaded one."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from evocomp.mllm.reference import build_processor, build_tokenizer

    tok = build_tokenizer()
    n = (image_size // patch) ** 2
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=image_size,
            patch_size=patch,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=n,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(cfg)
    model.save_pretrained(path)
    proc = build_processor(tok)
    proc.image_processor.size = {"shortest_edge": image_size}
    proc.image_processor.crop_size = {"height": image_size, "width": image_size}
    proc.patch_size = patch
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """A small shapes-vqa dataset in LLaVA format (2 questions per image)."""
    from evocomp.data.synth import write_dataset

    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, n=40, seed=3, questions_per_image=2)
    return out


from tests.pg import postgres_server, postgres_url  # noqa: E402, F401  (session PostgreSQL fixtures)
