from __future__ import annotations

from pathlib import Path

import click

from cachekd_cli.common import echo_json
from cachekd_cli.main import cli


def _report_rows(result: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(summary rows, per-phenomenon rows, per-group rows) of an evaluation result."""
    from cachekd.rundir import prefix_label

    summary = {"model": result["model"], "num_params": result.get("num_params")}
    for key, d in (result.get("losses") or {}).items():
        summary |= {"measured": key, "loss": d["loss"], "ppl": d["ppl"], "num_tokens": d["num_tokens"],
                    "num_windows": d["num_windows"]}
    ac = result.get("against_cache")
    if ac:
        for t, r in ac["teachers"].items():
            summary |= {f"kl({t}||student)": r["kl"], f"top1_agree({t})": r["top1_agreement"]}
    mp = result.get("minimal_pairs")
    files, groups = [], []
    if mp:
        summary |= {"mp_macro_acc": mp["macro_accuracy"], "mp_micro_acc": mp["micro_accuracy"],
                    "num_pairs": mp["num_pairs"], "prefix": prefix_label(mp["prefix"])}
        if mp.get("max_pairs") is not None:
            summary |= {"max_pairs": mp["max_pairs"], "pair_seed": mp["seed"]}
        files = [{"phenomenon": stem, "group": r["group"], "pairs": r["num_pairs"], "accuracy": r["accuracy"]}
                 for stem, r in mp["by_file"].items()]
        groups = [{"group": g, "phenomena": r["num_files"], "pairs": r["num_pairs"], "accuracy": r["accuracy"]}
                  for g, r in mp["by_group"].items()]
    return [summary], files, groups


@cli.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--dev", "dev_store", type=click.Path(), default=None,
              help="Token store to compute the dev loss and perplexity on (must use the model's tokenizer).")
@click.option("--split", default="dev", show_default=True, help="Split of the token store: dev or train.")
@click.option("--minimal-pairs", type=click.Path(path_type=Path), default=None,
              help="BLiMP-format .jsonl file, or a directory of them (one phenomenon a file).")
@click.option("--prefix", default=None, metavar="TEXT",
              help="Context put before every minimal-pair sentence, not scored: `eos` (default: the end-of-text "
                   "token that precedes every document in a token store), `bos` (the begin-of-text token <s>, as "
                   "BabyLM's BLiMP scoring does for models trained with it), or any text.")
@click.option("--no-prefix", is_flag=True, help="No context: score each sentence from its second token.")
@click.option("--max-pairs", default=None, type=click.IntRange(min=1), metavar="N",
              help="Score at most N pairs of each minimal-pair file (BLiMP has 1,000 a file), a random choice "
                   "without replacement fixed by --pair-seed and the file's name. Saved apart from a full-file "
                   "result; `cachekd compare` shows each in its own column.")
@click.option("--pair-seed", default=0, show_default=True, type=int, help="Seed of the --max-pairs choice.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Windows or sentences a batch.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda, cuda:1.")
@click.option("--max-windows", default=None, type=click.IntRange(min=1),
              help="Evaluate only the first N windows of --split (a quick check: saved apart from the whole-split "
                   "loss, and not reported by `cachekd compare`).")
@click.option("--against-cache", type=click.Path(), default=None,
              help="Also report mean KL(teacher || student) and top-1 agreement with each teacher of this logit cache "
                   "(on --split of the cache's token store).")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@click.option("--markdown", is_flag=True, help="Print Markdown tables.")
@click.option("--save/--no-save", default=True, show_default=True,
              help="When MODEL is a run directory or its RUN/model, merge the result into RUN/eval.json (read by "
                   "`cachekd compare`).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_command(model, dev_store, split, minimal_pairs, prefix, no_prefix, max_pairs, pair_seed, batch_size, device,
                 max_windows, against_cache, as_json, markdown, save, quiet):
    """Evaluate a checkpoint: dev loss / perplexity on a token store, and accuracy on BLiMP-style minimal pairs
    (a pair counts when the model gives the good sentence a higher log-probability than the bad one).

    MODEL is a run directory of `cachekd train`/`distill`, or its RUN/model directory (either way the model in
    RUN/model is evaluated and the result is saved into RUN/eval.json, unless --no-save), or any Hugging Face
    checkpoint directory (nothing is saved). In RUN/eval.json each loss is kept under what was measured: "dev" for
    the whole dev split, "train:first50" for --split train --max-windows 50, and so on; `cachekd compare` reports
    only the whole dev split as a run's dev loss. Minimal-pair results are kept by file set, prefix and
    --max-pairs: scoring other files or another prefix adds a result and never replaces one of another kind. With
    --json the loss is under "losses" (by what was measured) and also under "dev" only when it is the whole dev
    split.

    \b
    Examples:
      cachekd eval runs/student --dev runs/tokens --minimal-pairs demo/minimal_pairs
      cachekd eval runs/student --minimal-pairs blimp/ --no-prefix --json
      cachekd eval runs/student --minimal-pairs blimp/ --max-pairs 100
      cachekd eval path/to/hf-checkpoint --dev runs/tokens --max-windows 200 --device cuda
      cachekd eval runs/student --dev runs/tokens --against-cache runs/cache
    """
    from cachekd.evaluate import evaluate
    from cachekd.rundir import RunDir
    from cachekd.report import format_table, markdown_table

    if no_prefix and prefix is not None:
        raise click.UsageError("--prefix and --no-prefix exclude each other; give one.")
    if as_json and markdown:
        raise click.UsageError("--json and --markdown exclude each other; give one.")
    if max_pairs is not None and minimal_pairs is None:
        raise click.UsageError("--max-pairs limits the pairs of --minimal-pairs; give the pairs too.")
    result = evaluate(
        model, dev_store=dev_store, minimal_pairs=minimal_pairs, split=split,
        prefix=None if no_prefix else (prefix if prefix is not None else "eos"), batch_size=batch_size,
        device=device, max_windows=max_windows, against_cache=against_cache, progress=not quiet and not as_json,
        max_pairs=max_pairs, pair_seed=pair_seed,
    )
    saved = None
    run_dir = RunDir.of_model_path(model)
    if save and run_dir is not None:
        saved = run_dir.save_eval(result)
    if as_json:
        echo_json(result | ({"saved": str(saved)} if saved else {}))
        return
    summary, files, groups = _report_rows(result)
    table = markdown_table if markdown else format_table
    click.echo(table(summary))
    if files:
        click.echo("")
        click.echo(table(files))
        click.echo("")
        click.echo(table(groups))
    if saved:
        click.echo("")
        click.echo(_saved_note(result, saved))


def _saved_note(result: dict, saved: Path) -> str:
    """Where the result went in RUN/eval.json, and whether `cachekd compare` will report its loss."""
    parts = []
    for key in result.get("losses") or {}:
        parts.append(f"the loss under losses[{key!r}]" + (" (the run's dev loss for `cachekd compare`)" if key == "dev"
                     else " (not the whole dev split, so `cachekd compare` does not report it)"))
    if "minimal_pairs" in result:
        parts.append(f"minimal pairs under minimal_pairs_results[{result['minimal_pairs']['key']!r}]")
    if "against_cache" in result:
        parts.append(f"agreement with the cache ({result['against_cache']['split']} split)")
    return f"Saved to {saved}: {', '.join(parts)}."
