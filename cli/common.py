"""Helpers shared by the click commands: error handling, config loading, printing."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from cachekd.errors import CachekdError, ConfigFieldError, ConfigKeysError
from cachekd_cli.single_options import SingleOptionsGroup


class CachekdGroup(SingleOptionsGroup):
    """A click group that turns user errors into one sentence and a non-zero exit, never a traceback; its commands
    and subgroups refuse an option given twice."""

    def invoke(self, ctx: click.Context) -> Any:
        from cachekd_cli.config_options import error_message

        try:
            return super().invoke(ctx)
        except ConfigFieldError as e:  # starts with the config key, written as it is (distill.alpha, seed)
            raise click.ClickException(error_message(e, ctx.invoked_subcommand)) from None
        except ConfigKeysError as e:  # names keys: each becomes the command's option for it
            raise click.ClickException(_sentence(error_message(e, ctx.invoked_subcommand))) from None
        except CachekdError as e:
            raise click.ClickException(_sentence(_user_message(e))) from None
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
            # train/distill say themselves how to continue (with --resume); these start again from scratch.
            if ctx.invoked_subcommand in ("eval", "compare", "presets"):
                click.echo("\nInterrupted; nothing was saved: run the same command again.", err=True)
            else:
                click.echo("\nInterrupted; run the same command again to continue where it stopped.", err=True)
            sys.exit(130)


def comma_list(text: str, option: str, convert: Callable[[str], Any] = str, what: str = "values") -> list[Any]:
    """The comma-separated values of `option`, each converted; an empty entry ('1,,2', ',') is refused rather than
    skipped, since it is more likely a value left out than a stray comma."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or not all(items):
        raise click.BadParameter(f"an empty entry in {text!r}: give comma-separated {what}, none empty.",
                                 param_hint=option)
    try:
        return [convert(t) for t in items]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated {what}, got {text!r}.", param_hint=option) from None


def _user_message(e: CachekdError) -> str:
    """The error's own sentence. torch's DataLoader re-raises an exception from a worker process as the same type
    with the worker's whole traceback as its message ("Caught ... Original Traceback ..."): keep its last line."""
    msg = str(e)
    if msg.startswith("Caught ") and "\nOriginal Traceback" in msg:
        last = [ln for ln in msg.splitlines() if ln.strip()][-1]
        prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
        if last.startswith(prefix):
            return last[len(prefix):]
        return last.split(": ", 1)[-1]
    return msg


def _sentence(msg: str) -> str:
    msg = msg.strip()
    first = msg.split(" ", 1)[0]
    if msg and msg[0].islower() and not any(c in first for c in "._"):  # leave config keys (distill.alpha) as written
        msg = msg[0].upper() + msg[1:]
    return msg if msg.endswith((".", "?", "!")) else msg + "."


def exit_interrupted(e: Any, what_next: str) -> NoReturn:
    """A run stopped by SIGINT/SIGTERM at a step boundary (`cachekd.trainer.TrainingInterrupted` `e`): say where it
    stopped and `what_next`, and exit with the signal's status (128 + its number)."""
    import signal

    click.echo(f"\nStopped by {signal.Signals(e.signum).name} at step {e.step} of {e.total_steps}; {what_next}",
               err=True)
    sys.exit(128 + e.signum)


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
