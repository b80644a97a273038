"""The Optuna search around training: `tune:` config, the study and its workers, a trial's
objective, and the report it leaves."""
