"""The `features` stage: per-sample visual tokens, vocabulary groups and attention scores,
computed once (:mod:`.compute`) and cached on disk (:mod:`.cache`); the semantic grouping
(:mod:`.grouping`) names each token by its nearest vocabulary word."""
