"""Infrastructure shared by the pipeline and the trainer: the TOML config loader
(common.config) and the user-facing error base class (common.errors). Standard library only, so
that loading a model (trainer.model) needs torch and this, not the pipeline."""
