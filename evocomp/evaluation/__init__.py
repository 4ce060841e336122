"""The `evaluate` stage: every method x keep ratio (:mod:`.harness`), the stage around it
(:mod:`.run`), how results are shown (:mod:`.report`) and what counts as correct
(:mod:`.answers`)."""
