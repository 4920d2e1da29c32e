"""Registers every command on the `cachekd` group: each `*_cmd` module in this package adds one command.

Each command parses its options, loads its config and calls one library function.
"""

import importlib
import pkgutil

import cachekd_cli

for _mod in sorted(m.name for m in pkgutil.iter_modules(cachekd_cli.__path__) if m.name.endswith("_cmd")):
    importlib.import_module(f"cachekd_cli.{_mod}")
