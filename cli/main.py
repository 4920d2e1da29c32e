"""`cachekd`: prepare a corpus, cache teacher logits once, distil many students from the cache."""

from __future__ import annotations

import click

from cachekd import __version__
from cachekd_cli.common import CachekdGroup


@click.group(cls=CachekdGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="cachekd")
def cli() -> None:
    """Knowledge distillation of language models from an offline teacher-logit cache.

    \b
    The job, end to end:
      cachekd prepare    corpus -> tokenizer + token store (fixed windows)
      cachekd train      train a teacher (or a CE-only baseline) on the token store
      cachekd precompute run the teacher(s) ONCE -> sharded Zarr logit cache (top-k or full)
      cachekd distill    train any number of students from the cache; no teacher is loaded
      cachekd eval       perplexity, BLiMP-style minimal pairs, agreement with the cache
      cachekd compare    table and plots of several runs
      cachekd demo       the whole job on a built-in corpus, on CPU, in minutes
    """


def main() -> None:
    cli(prog_name="cachekd")


from cachekd_cli import commands  # noqa: E402,F401  registers the commands on import
