"""Helpers shared by the click commands: error handling, config loading, printing."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from cachekd.errors import CachekdError


class CachekdGroup(click.Group):
    """A click group that turns user errors into one sentence and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CachekdError as e:
            raise click.ClickException(_sentence(str(e))) from None
        except FileNotFoundError as e:
            raise click.ClickException(f"file not found: {e.filename or e}.") from None
        except BrokenPipeError:
            sys.exit(0)
        except PermissionError as e:
            raise click.ClickException(f"permission denied: {e.filename or e}.") from None
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                raise click.ClickException(
                    "the disk is full; free space and run the same command again (finished parts are kept)."
                ) from None
            raise click.ClickException(f"{e.strerror or e}: {e.filename or ''}".strip(": ") + ".") from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted; run the same command again to continue where it stopped.", err=True)
            sys.exit(130)


def _sentence(msg: str) -> str:
    msg = msg.strip()
    if msg and msg[0].islower():
        msg = msg[0].upper() + msg[1:]
    return msg if msg.endswith((".", "?", "!")) else msg + "."


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def echo_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    from cachekd.report import format_table

    click.echo(format_table(rows, columns))


def echo_mapping(d: dict[str, Any], indent: int = 0) -> None:
    pad = " " * indent
    width = max((len(str(k)) for k in d), default=0)
    for k, v in d.items():
        if isinstance(v, dict):
            click.echo(f"{pad}{k}:")
            echo_mapping(v, indent + 2)
        else:
            click.echo(f"{pad}{str(k).ljust(width)}  {v}")
