"""The MLLM side: one protocol (:mod:`.base`), checkpoint checks and ids (:mod:`.checkpoint`),
the loader and one adapter per family (LLaVA, Qwen2-VL / Qwen2.5-VL, Gemma 3) over a shared
LLM side (:mod:`.hf_adapter`), prompts (:mod:`.prompts`), sequence building, greedy decoding,
and the reference model with its recipe and evaluation."""
