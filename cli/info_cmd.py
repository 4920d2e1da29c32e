from __future__ import annotations

from pathlib import Path

import click

from cachekd.errors import CachekdError
from cachekd_cli.common import echo_json, echo_mapping
from cachekd_cli.main import cli


def describe(path: str | Path) -> dict:
    """Summary of a token store or a logit cache, whichever `path` holds."""
    from cachekd.cache.format import is_logit_cache
    from cachekd.storage import location
    from cachekd.tokens import TokenStore, is_token_store

    path = location(path)
    if not path.exists():
        raise CachekdError(f"{str(path)!r} does not exist.")
    if is_token_store(path):
        return TokenStore.open(path).summary()
    if is_logit_cache(path):
        from cachekd.cache.reader import LogitCache
        from cachekd.cache.summary import cache_summary

        return cache_summary(LogitCache.open(path, allow_incomplete=True))
    raise CachekdError(f"{str(path)!r} is neither a token store nor a logit cache.")


@cli.command("info")
@click.argument("path", type=click.Path())  # (a local path or a URL)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info_command(path: str, as_json: bool):
    """Show what a token store or a logit cache holds: for a store its splits, windows and tokenizer; for a cache
    its teachers, k, temperatures, chunks done, bytes/position, captured top-k mass and teacher entropy.

    \b
    Examples:
      cachekd info runs/tokens
      cachekd info runs/cache --json
    """
    summary = describe(path)
    if as_json:
        echo_json(summary)
    elif summary.get("kind") == "logit cache":
        from cachekd.cache.summary import summary_text

        echo_mapping(summary_text(summary))
    else:
        echo_mapping(summary)
