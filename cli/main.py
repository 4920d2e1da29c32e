"""`cachekd`: prepare a corpus, cache teacher logits once, distil many students from the cache."""

from __future__ import annotations

import click

from cachekd import __version__
from cachekd_cli.common import CachekdGroup


@click.group(cls=CachekdGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="cachekd")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="An option for the object store's filesystem (fsspec; s3fs for s3:// URLs), e.g. "
                   "endpoint_url=http://127.0.0.1:9000 or anon=true; repeatable. Credentials and the endpoint also "
                   "come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL.")
@click.option("--chunk-cache", "chunk_cache", type=click.Path(file_okay=False), default=None,
              help="Keep chunks read from an object store in a local cache under this directory (for re-reads "
                   "across epochs; removed when the command ends).")
@click.option("--chunk-cache-size", "chunk_cache_size", default="4G", show_default=True, metavar="BYTES",
              help="Size bound of --chunk-cache (K, M, G suffixes); least recently used chunks are evicted.")
def cli(storage_options: tuple[str, ...], chunk_cache: str | None, chunk_cache_size: str) -> None:
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

    Token stores and caches may be URLs of an object store (s3://bucket/prefix, gs://, az://); run directories
    stay local.
    """
    from cachekd import storage

    storage.configure(list(storage_options), chunk_cache_dir=chunk_cache,
                      chunk_cache_bytes=storage.parse_size(chunk_cache_size))


def main() -> None:
    cli(prog_name="cachekd")


from cachekd_cli import commands  # noqa: E402,F401  registers the commands on import
