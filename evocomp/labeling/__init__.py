"""The `label` stage: one sample (:mod:`.sample`), which samples (:mod:`.selection`), a run's
steps (:mod:`.steps`) and the loop over them (:mod:`.run`), per-process worker state (:mod:`.worker`), progress
(:mod:`.progress`) and the run's metrics (:mod:`.report`)."""
