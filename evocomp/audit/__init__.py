"""The label audit behind the dashboard: pure functions over label facts, no UI, no store.

- :mod:`evocomp.audit.suspects`: suspect scores, run health, keep/drop balance;
- :mod:`evocomp.audit.ghm`: GHM-C bins / momentum / cosine weight from the compressor;
- :mod:`evocomp.audit.params_edit`: writing a recommendation into params.yaml.
"""
