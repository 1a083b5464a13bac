"""The configs that ship with the package: ``ntrk predict -c digits_ntrk`` from any directory.

The repository's ``configs/`` folder (YAML configs and the prompt lists in ``configs/prompts/``)
is package data: ``ntrk_lightning/configs`` links to it in a checkout, and a built wheel holds a
copy of it there. So the same lookup works in a checkout, an editable install and a plain
``pip install``.

* a *config name* is a bare word such as ``digits_ntrk`` (``.yaml`` optional): no path separator,
  and not an existing file in the working directory (a file always wins);
* configs refer to data files by paths relative to the repository root (``prompts_file:
  configs/prompts/animals45.txt``); when such a path does not exist from the working directory,
  :func:`data_path_overrides` points it at the shipped file, so a config run by name (or copied
  out with ``ntrk configs --copy``) finds its prompt list anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

#: prefix of data paths inside configs that the shipped files can stand in for
DATA_PREFIX = "configs/"


class ConfigError(ValueError):
    """A config name that is not shipped, or a copy that would overwrite a file."""


@dataclass(frozen=True)
class BuiltinConfig:
    name: str
    path: Path
    subcommand: str  # "predict" or "fit"
    summary: str


def configs_dir() -> Path:
    """The folder holding the shipped configs (``ntrk_lightning/configs``)."""
    return Path(str(resources.files("ntrk_lightning") / "configs"))


def _summary(text: str, limit: int = 100) -> str:
    """The first sentence of the leading comment block of a YAML file."""
    words: list[str] = []
    for line in text.splitlines():
        s = line.strip()
        if not s.startswith("#"):
            break
        s = s.lstrip("#").strip()
        if not s:
            if words:
                break
            continue
        words.append(s)
    joined = " ".join(words)
    if ". " in joined:
        joined = joined.split(". ", 1)[0] + "."
    return joined if len(joined) <= limit else joined[:limit - 3].rstrip() + "..."


def _subcommand(path: Path) -> str:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return "?"
    model = data.get("model") if isinstance(data, dict) else None
    cls = model.get("class_path", "") if isinstance(model, dict) else ""
    return "predict" if cls.endswith("GenerationModule") else "fit"


def list_configs() -> list[BuiltinConfig]:
    """Every shipped config, sorted by name."""
    root = configs_dir()
    out = []
    for p in sorted(root.glob("*.yaml")):
        out.append(BuiltinConfig(p.stem, p, _subcommand(p), _summary(p.read_text(encoding="utf-8"))))
    return out


def is_config_name(arg: str) -> bool:
    """``arg`` names a shipped config rather than a file: a bare word that is not an existing file."""
    if not arg or os.sep in arg or "/" in arg or (os.altsep and os.altsep in arg):
        return False
    return not Path(arg).exists()


def resolve(name: str) -> Path:
    """Path of the shipped config ``name`` (``digits_ntrk`` or ``digits_ntrk.yaml``)."""
    stem = name[:-5] if name.endswith(".yaml") else name[:-4] if name.endswith(".yml") else name
    path = configs_dir() / f"{stem}.yaml"
    if not path.is_file():
        names = ", ".join(c.name for c in list_configs())
        raise ConfigError(f"no config file or built-in config named {name!r} (built-in: {names}; "
                          "`ntrk configs` lists them)")
    return path


def _walk(node: Any, key: str = ""):
    """(dotted key, value) of every string leaf reachable through mappings."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(k, str):
                yield from _walk(v, f"{key}.{k}" if key else k)
    elif isinstance(node, str):
        yield key, node


def data_path_overrides(config: Path, cwd: Optional[Path] = None) -> list[str]:
    """Command-line overrides that point the config's missing ``configs/...`` data paths (prompt
    lists) at the shipped files, e.g. ``["--data.init_args.prompts_file", "/.../animals45.txt"]``.

    A path that exists from the working directory is kept: a checkout, or a user's own file."""
    import yaml

    cwd = Path.cwd() if cwd is None else cwd
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []  # the CLI reports an unreadable config itself
    root = configs_dir()
    out: list[str] = []
    for key, value in _walk(data):
        if not value.startswith(DATA_PREFIX) or (cwd / value).exists():
            continue
        shipped = root / value[len(DATA_PREFIX):]
        if shipped.is_file():
            out += [f"--{key}", str(shipped)]
    return out


def copy_config(name: str, dest_dir: Path) -> Path:
    """Write the shipped config ``name`` to ``dest_dir/<name>.yaml``: complete or not at all, and
    never over an existing file (the temporary file is hard-linked into place, which fails if the
    name is taken, even when another process created it a moment ago)."""
    import tempfile

    src = resolve(name)
    dest_dir = Path(dest_dir)
    if dest_dir.exists() and not dest_dir.is_dir():
        raise ConfigError(f"{dest_dir} exists and is not a folder")
    dest = dest_dir / src.name
    if dest.exists():
        raise ConfigError(f"{dest} exists; not overwriting it (remove it or choose another folder)")
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(src.read_bytes())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, dest)
        except FileExistsError:
            raise ConfigError(f"{dest} exists; not overwriting it (remove it or choose another folder)") from None
    finally:
        os.unlink(tmp)
    return dest
