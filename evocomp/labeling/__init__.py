"""The `label` stage: one sample (:mod:`.sample`), which samples (:mod:`.selection`), a whole
run step by step (:mod:`.run`), per-process worker state (:mod:`.worker`), progress
(:mod:`.progress`) and the run's metrics (:mod:`.report`)."""
