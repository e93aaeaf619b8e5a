"""Infrastructure shared by the pipeline and the trainer: the TOML config loader
(common.config), the user-facing error base class (common.errors), the one atomic writer of every output
(common.files), where the bundled configs and
models are (common.bundled) and the text of every command's --version (common.version).
Standard library only, so that loading a model (trainer.model) needs torch and this, not the
pipeline (common.version reaches into the pipeline only when --version is given)."""
