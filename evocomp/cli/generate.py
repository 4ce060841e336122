"""`evocomp generate`: answer one question about one image with the compressor inside generate().

evocomp generate --model models/mllm --compressor models/compressor \\
    --image cat.png --question "what colour is the cat ?" --keep-ratio 0.333 --json

With one compressor per label budget (``label.budgets``), ``--compressor`` repeats and the
keep ratio is served as ``evocomp evaluate`` served it: by the compressor ``--route`` (an
evaluation's eval.json: its ``compressor_for_ratio``) names for it, else by the one trained
nearest it. ``--route`` alone takes its compressors from the eval.json:

evocomp generate --model models/scenes/mllm --route metrics/scenes/eval.json \\
    --image scene.png --question "how many red objects are there ?" --keep-ratio 0.111

Greedy decoding; the prompt is the checkpoint's template (``USER: <image>\\n{question}
ASSISTANT:`` for LLaVA-1.5 and LLaVA-NeXT/vicuna, the chat template for Qwen2-VL / Qwen2.5-VL,
Gemma 3 and LLaVA-OneVision) and the compressor keeps ``keep_count(ratio, N)`` visual tokens
before the LLM (:mod:`evocomp.deploy`; LLaVA-NeXT / OneVision: N base and tile tokens of this
image, its newlines always fed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from evocomp.cli.common import (
    USER_ERRORS,
    DeviceOpt,
    DtypeOpt,
    ParamsOpt,
    fail,
    model_options,
    params_or_exit,
)


def generate(
    image: Path = typer.Option(..., help="the image file"),
    question: str = typer.Option(..., help="the question about it"),
    model: Path = typer.Option(None, help="checkpoint (default: mllm.checkpoint)"),
    compressor: list[Path] = typer.Option(
        None,
        help="from `evocomp train`; repeat for one per label budget (default: the --route "
        "file's, else models/compressor)",
    ),
    route: Path = typer.Option(
        None,
        help="an `evocomp evaluate` result (eval.json): the compressor its compressor_for_ratio "
        "names serves the keep ratio",
    ),
    keep_ratio: float = typer.Option(0.333, help="fraction of the visual tokens kept, (0, 1]"),
    fill: bool = typer.Option(
        False,
        help="beyond the compressor's training labels' keep ratio, keep DivPrune's max-min "
        "picks from its top tokens (evaluate's evocomp_fill)",
    ),
    prompt_template: str = typer.Option(
        None, help="the prompt template the labels were made with (default: the checkpoint's)"
    ),
    max_new_tokens: int = typer.Option(16, min=1),
    as_json: bool = typer.Option(
        False, "--json", help="print the answer with the kept token indices, k, N and seconds"
    ),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    params_path: Path = ParamsOpt,
) -> None:
    """Answer QUESTION about IMAGE, keeping only the compressor's top visual tokens."""
    import torch

    from evocomp.data.samples import load_image
    from evocomp.deploy import compress_model, load_checkpoint
    from evocomp.deploy.attach import checkpoint_config
    from evocomp.deploy.scorer import BudgetScorers, TokenScorer, route_of_evaluation
    from evocomp.mllm.checkpoint import checkpoint_id
    from evocomp.tokens import keep_count

    params = params_or_exit(params_path)
    checkpoint, device, dtype = model_options(params, model, device, dtype)
    try:
        keep_count(keep_ratio, 1)
    except ValueError as err:
        fail(f"--keep-ratio: {err}")
    if not question.strip():
        fail("--question is empty")
    try:
        picture = load_image(image)
        # Checks that read no weights first: a wrong checkpoint or compressor fails in a second.
        served = route_of_evaluation(route) if route else None
        if not compressor:  # the route's folders, each once, in its order
            compressor = (
                list(dict.fromkeys(served.values())) if served else [Path("models/compressor")]
            )
        config = checkpoint_config(checkpoint)
        model_id = checkpoint_id(checkpoint, prompt_template)
        hidden = config.text_config.hidden_size
        BudgetScorers([TokenScorer(c, hidden, model_id, fill=fill) for c in compressor], served)
        mllm, processor, model_id = load_checkpoint(checkpoint, device, dtype, prompt_template)
        handle = compress_model(
            mllm,
            processor,
            compressor,
            keep_ratio,
            prompt_template=prompt_template,
            model_id=model_id,
            fill=fill,
            route=served,
        )
        inputs = processor(images=picture, text=handle.prompt(question), return_tensors="pt")
        inputs = inputs.to(mllm.device)
        t0 = time.perf_counter()
        with handle, torch.no_grad():
            out = mllm.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, question=question
            )
        seconds = time.perf_counter() - t0
    except USER_ERRORS as err:
        fail(str(err))
    new = out[0, inputs["input_ids"].shape[1] :]
    answer = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    if not as_json:
        typer.echo(answer)
        return
    sel = handle.last
    assert sel is not None  # the prompt holds the image
    typer.echo(
        json.dumps(
            {
                "answer": answer,
                "kept": sel.kept[0].tolist(),
                "k": sel.k,
                "n_tokens": sel.n_tokens,
                "keep_ratio": keep_ratio,
                "question": sel.questions[0],
                "prompt_tokens": sel.prompt_tokens,
                "prefill_tokens": sel.prefill_tokens,
                "seconds": round(seconds, 4),
                "model_id": model_id,
                "compressor": str(handle.last_compressor),
            }
        )
    )
