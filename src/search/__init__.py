"""Optuna search over compression settings: ``python -m src.search search=accuracy_per_mb``.

Each trial composes the project config with the sampled overrides and runs one tracked
experiment (``src.experiment.run``) as a nested MLflow run under this worker's parent run, in a
process of its own by default (``search.trial_process``), so a native crash fails one trial.
Single-objective studies stop hopeless trials early on an estimate of the objective per
fine-tuning epoch ("trial early stopping"; Optuna's name for it is pruning).

Modules: ``settings`` (the search-space language), ``sampling`` (space -> overrides),
``objectives`` (directions, values, per-epoch estimates), ``study`` (study and storage),
``trial`` (running one trial), ``trial_process`` (a trial in its own process),
``early_stop`` (per-epoch reports), ``orphans`` (what dead workers leave), ``worker`` (the loop,
the failure cap, the trial lines and the closing report), ``__main__`` (the command).
Nothing is imported here, so reading the settings does not load TensorFlow.
"""
