"""The compressor: the model (:mod:`.model`), how it is fitted (:mod:`.fit`) and the `train`
stage that fits it on a label set (:mod:`.training`)."""
