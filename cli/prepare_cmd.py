from __future__ import annotations

import click

from cachekd_cli.common import echo_json, echo_mapping
from cachekd_cli.main import cli


@cli.command("prepare")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(), help="Directory of the token store to write.")
@click.option("--seq-len", default=128, show_default=True, type=int, help="Window length in tokens.")
@click.option("--vocab-size", default=16000, show_default=True, type=int, help="Vocabulary of the byte-level BPE to train.")
@click.option("--tokenizer", default=None, type=click.Path(), help="Use an existing tokenizer (HF directory or tokenizer.json) instead of training one.")
@click.option("--text-column", default="text", show_default=True, help="Text column of jsonl/parquet/csv/saved datasets.")
@click.option("--doc-sep", type=click.Choice(["blank-line", "line", "file"]), default="blank-line", show_default=True,
              help="What one document is in plain text files.")
@click.option("--clean/--no-clean", default=False, show_default=True,
              help="Light cleaning: Unicode NFC, collapse spaces, strip lines, drop empty lines.")
@click.option("--dev-fraction", default=0.05, show_default=True, type=float, help="Share of each source's documents held out for dev (0: none); a note says when the dev share of tokens differs much from it.")
@click.option("--dev-mode", type=click.Choice(["tail", "docs"]), default="tail", show_default=True,
              help="tail: the last documents of each source file; docs: a seeded random choice of documents.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--force", is_flag=True, help="Replace the token store at the output path: one built from other inputs, or build a "
                   "damaged one again from the same inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the resulting manifest summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def prepare_command(inputs, output, seq_len, vocab_size, tokenizer, text_column, doc_sep, clean, dev_fraction,
                    dev_mode, seed, force, as_json, quiet):
    """Turn text into a token store: train (or load) a tokenizer, join documents with an end-of-text token, cut
    fixed windows of --seq-len tokens, hold out a dev split.

    INPUTS are text files, directories or globs (BabyLM's *.train files), local .jsonl/.json/.parquet/.csv files
    (see --text-column), or datasets saved with `save_to_disk`. Re-running with the same inputs and options does
    nothing; a different store at --output is replaced only with --force, and --force with the same inputs builds
    the store again (the way to repair one that `cachekd verify` found damaged).

    \b
    Example:
      cachekd prepare data/babylm_10M/*.train -o runs/tokens --vocab-size 16000 --seq-len 128
    """
    from cachekd.tokens import PrepareConfig, prepare

    cfg = PrepareConfig(
        inputs=list(inputs), output=output, seq_len=seq_len, vocab_size=vocab_size, tokenizer=tokenizer,
        text_column=text_column, doc_sep=doc_sep, clean=clean, dev_fraction=dev_fraction, dev_mode=dev_mode, seed=seed,
    )
    store, built = prepare(cfg, force=force, progress=not quiet and not as_json)
    summary = store.summary() | {"built": built}
    asked = summary.get("vocab_size_requested")
    if built and asked:
        click.echo(
            f"note: the tokenizer learned {summary['vocab_size']} tokens, not the {asked} asked for: the training "
            f"text has too few pairs that occur at least twice; models built on this store use {summary['vocab_size']}.",
            err=True,
        )
    splits = summary.get("splits", {})
    if built and dev_fraction > 0 and "dev" in splits:
        dev_tokens = splits["dev"]["num_tokens"]
        share = dev_tokens / max(dev_tokens + splits["train"]["num_tokens"], 1)
        if share > 2 * dev_fraction or share < dev_fraction / 2:
            click.echo(
                f"note: the dev split holds {share:.0%} of the tokens, while --dev-fraction {dev_fraction:g} holds out "
                f"that share of each file's documents: the documents differ much in size. Cut the text into smaller "
                f"documents (--doc-sep line) or pick the share to match, then prepare again with --force.",
                err=True,
            )
    if as_json:
        echo_json(summary)
        return
    if not built and "dev_share_by_source" not in summary and dev_fraction > 0:
        click.echo(
            f"note: {output} was prepared before cachekd recorded each source's dev share and windows: a source of "
            f"one document got no dev share then, and the trainer's dev sample cannot be drawn per source; pass "
            f"--force to build it again (its fingerprint, and its caches, change only if a source was one document).",
            err=True,
        )
    if not built:
        click.echo(f"{output} is already up to date with these inputs and options; nothing to do.")
    else:
        click.echo(f"Wrote token store {output}")
    echo_mapping({k: v for k, v in summary.items() if k not in ("built",)})
