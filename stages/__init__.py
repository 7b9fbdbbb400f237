"""Every step of the DAG that writes a version under ``ROOT/<dataset>/<stage>/<version>/``.

The bootstrap stages (source -> extend -> filter -> implant -> export) are pure functions over
one shard (stages/base.py lists them; stages/runner.py plans, runs and commits them); the
defender, attacker, curriculum, attack, evaluation and co-evolution stages write single
versions through one find-or-compute helper (stages/version.py). No Prefect here: tasks/ and
flows/ wrap these functions. This package imports nothing eagerly, so that a stage's version id
hashes only the code that stage runs.
"""
