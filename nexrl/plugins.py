"""Load user code named in config: "path/to/file.py:Class" or "package.module:Class".

Evaluators, custom rollout classes, custom nodes and trainers are all named this way; the
registries (`nexrl.nodes.ROLES`, ...) are plain dicts from a short name to such a string, and
nothing is imported before it is needed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any


class PluginError(ImportError):
    """A plugin reference that cannot be loaded; the text says which and why."""


def load_object(ref: str, base_dir: str | Path | None = None) -> Any:
    """The object named by `ref` ("file.py:Name" relative to base_dir/cwd, or "pkg.mod:Name")."""
    if ":" not in ref:
        raise PluginError(f"plugin reference {ref!r} must look like 'file.py:Name' or 'pkg.module:Name'")
    where, _, name = ref.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = Path(base_dir) / path
        if not path.exists():
            raise PluginError(f"plugin file {where} (from {ref!r}) does not exist")
        mod_name = f"nexrl_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(mod_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            if spec is None or spec.loader is None:
                raise PluginError(f"cannot import {path} (from {ref!r})")
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception:
                del sys.modules[mod_name]
                raise
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise PluginError(f"cannot import module {where!r} (from {ref!r}): {e}") from e
    try:
        return getattr(module, name)
    except AttributeError:
        raise PluginError(f"{where} has no attribute {name!r} (from {ref!r})") from None
