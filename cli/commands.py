"""Registers every command on the `cachekd` group. Each command: parse, load config, call one library function."""

from cachekd_cli import info_cmd, prepare_cmd  # noqa: F401
