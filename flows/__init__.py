"""Prefect flows: thin orchestration over the ``evocomp`` library.

- ``flows.label.label_dataset``: label samples with the genetic search, one task per sample
  (``evocomp label``).
- ``flows.pipeline.retrain``: ``dvc repro`` of the whole pipeline, for a scheduled
  deployment (``evocomp serve --cron "0 2 * * *"``).

Importing this package applies the robust Prefect settings first (:mod:`evocomp.prefect_env`).
"""

import evocomp.prefect_env  # noqa: F401  (must run before prefect is imported)
