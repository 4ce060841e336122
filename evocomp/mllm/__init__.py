"""The MLLM side: one protocol (:mod:`.base`), the loader and adapter for HF checkpoints,
sequence building, greedy decoding, and the reference model with its recipe and evaluation."""
