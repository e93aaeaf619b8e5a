"""Where the files that ship with the code are: ``configs/`` (the shard and train configs) and
``models/`` (the pretrained model and its card), wherever the commands are run from.

A non-editable install (``pip install .``) carries them as package data inside this package
(``common/configs``, ``common/models``: pyproject.toml maps the repository's folders there); in
a checkout or an editable install they are the repository's own ``configs/`` and ``models/``,
beside this package. Neither depends on the current directory. Standard library only.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def bundled(name: str) -> Path:
    """The bundled folder ``name`` ("configs" or "models"): the installed copy inside this
    package if there is one, else the repository's folder (which may not exist: callers say so)."""
    installed = _HERE / name
    return installed if installed.is_dir() else _HERE.parent / name


def find_config(path: str | Path, kind: str) -> Path:
    """The config file that a command line's ``--config path`` names. ``kind``: "shards" or "train".

    ``path`` as given (absolute, or relative to the current directory) if that is a file; else,
    for a relative path, the file of that name in the bundled configs folder:
    ``configs/train/default.toml``, ``train/default.toml`` and ``default`` (``.toml`` optional) all
    name the bundled ``configs/train/default.toml`` for kind "train". Raises ConfigError (one line,
    with the bundled configs of that kind) when neither exists.

    Command lines apply it, not the loaders (``load_shard_config`` takes a path as given): the
    pipeline's code version hashes the config loader, and this rule never changes a sample."""
    from common.config import ConfigError

    given = Path(path)
    if given.is_file():
        return given
    root = bundled("configs")
    parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
    if parts and not given.is_absolute():
        rel = Path(*parts)
        names = [rel] if rel.suffix else [rel, rel.with_name(rel.name + ".toml")]
        for candidate in [root / n for n in names] + [root / kind / n for n in names]:
            if candidate.is_file():
                return candidate
    available = sorted(p.stem for p in (root / kind).glob("*.toml"))
    raise ConfigError(f"config file not found: {path} (not a file here, nor in the bundled configs "
                      f"{root / kind}: {', '.join(available) or 'none'})")
