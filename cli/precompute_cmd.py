from __future__ import annotations

import click

from cachekd_cli.common import comma_list, echo_json, echo_mapping
from cachekd_cli.main import cli


def _floats(ctx, param, value):
    return None if value is None else comma_list(value, param.opts[-1], float, "numbers")


def _names(ctx, param, value):
    return comma_list(value, param.opts[-1], what="names")


@cli.command("precompute")
@click.option("--store", required=True, type=click.Path(), help="Token store made by `cachekd prepare`.")
@click.option("--teacher", "teachers", multiple=True, required=True,
              help="Teacher: HF checkpoint dir, `cachekd train` run dir, a registry name, or NAME=PATH. Repeat for several.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Directory of the logit cache.")
@click.option("--top-k", default=None, type=int,
              help="Logits kept exactly per position. Alone: a top-k cache (e.g. --top-k 64); with --sample N: a "
                   "hybrid (0: a pure sampled cache). [default: neither given: --top-k 16 --sample 50]")
@click.option("--sample", default=None, type=int, metavar="N",
              help="Draw N ids per position from the teacher and store them with counts (RS-KD: an unbiased "
                   "forward-KL target); with --top-k K, N draws from beyond the exact top-K (a hybrid). Alone: "
                   "a pure sampled cache.")
@click.option("--proposal-temperature", default=None, type=float, metavar="T",
              help="Draw at this one temperature (one of --temperatures) instead of once per cached temperature.")
@click.option("--sample-seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the --sample draws.")
@click.option("--full", is_flag=True, help="Store all logits (fp16) instead of the top-k.")
@click.option("--factored", is_flag=True,
              help="Store per position the input of each teacher's output layer (d numbers) and that layer once: "
                   "every logit, for every objective, τ, mixing and combination, in about d bytes a position; "
                   "training rebuilds the logits with one matmul and never loads the teacher.")
@click.option("--factored-dtype", type=click.Choice(["int8", "bf16", "fp16"]), default="int8", show_default=True,
              help="How --factored stores the output layer's input: int8 with one scale a position (d + 4 bytes), "
                   "or 16-bit floats (2·d bytes).")
@click.option("--factored-rounding", type=click.Choice(["feedback", "nearest"]), default="feedback", show_default=True,
              help="int8 only: pass each dimension's rounding error on through the output layer (3-4x lower KL, "
                   "one sequential pass over d a batch) or round each value to its nearest step.")
@click.option("--factored-rank", default=None, type=int, metavar="R",
              help="With --factored: store R < d coefficients a position on the mean and R principal directions of "
                   "the output layer's input, fitted once on a seeded sample of train windows (not exact).")
@click.option("--factored-fit-windows", default=256, show_default=True, type=int,
              help="Train windows the --factored-rank basis is fitted on.")
@click.option("--factored-fit-seed", default=0, show_default=True, type=int,
              help="Seed of the windows the --factored-rank basis is fitted on.")
@click.option("--ensemble", type=click.Choice(["logits", "probs"]), default=None,
              help="Cache the teachers' combination as ONE teacher, 'ensemble': logits (Baby Llama: raw logits "
                   "averaged) or probs (probabilities averaged). Exact, where combining the teachers' sparse caches "
                   "at training time is not; the weights are fixed in the cache.")
@click.option("--ensemble-weights", default=None, callback=_floats, metavar="W1,W2,...",
              help="One weight per --teacher for --ensemble (default: equal).")
@click.option("--temperatures", default="1.0,2.0", show_default=True, callback=_floats,
              help="Temperatures to store the exact tail mass for (comma-separated).")
@click.option("--logprob-step", default=1 / 512, show_default="1/512", type=float,
              help="Fixed-point step of the stored log-probabilities; the largest error is half of it.")
@click.option("--splits", default="train,dev", show_default=True, callback=_names, help="Token-store splits to cache.")
@click.option("--batch-size", default=32, show_default=True, type=int, help="Windows per teacher forward.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Autocast dtype of the teacher forward (auto: bf16 on CUDA, fp32 on CPU).")
@click.option("--registry", type=click.Path(), default=None,
              help="YAML with `teachers: {name: path}` for --teacher NAME (default ./cachekd.yaml).")
@click.option("--part", default=None, help="i/n: take every n-th chunk from the i-th, for independent parallel jobs.")
@click.option("--force", is_flag=True, help="Start again over a cache begun with other settings.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def precompute_command(store, teachers, output, top_k, sample, proposal_temperature, sample_seed, full, factored,
                       factored_dtype, factored_rounding, factored_rank, factored_fit_windows, factored_fit_seed, ensemble,
                       ensemble_weights, temperatures, logprob_step, splits, batch_size, device, dtype, registry, part,
                       force, as_json, quiet):
    """Run the frozen teacher(s) ONCE over a token store and cache their outputs for every later student.

    Per position it keeps, by default, the exact top-16 teacher log-probabilities and ids, the distinct ids of 50
    draws from the teacher beyond them (per --temperatures value) with their counts and log-probabilities, the
    exact log-sum-exp of the rest (tail_lse), the normaliser and the entropy: an unbiased forward-KL target, and
    for every objective the stored ids plus the rest's exact mass (the fidelity figures in docs/sampled-caches.md
    say which to use when). `--top-k K` alone keeps only the top-K and tail_lse (a top-k cache), `--sample N` alone
    only draws, `--full` every logit, `--factored` every logit as the output layer's input and the layer (reverse
    KL, mixing, ensembles: exact). Killed at any moment, the same command
    resumes where it stopped. Under `torchrun --nproc-per-node N -m cachekd_cli precompute ...` each rank takes its own
    chunks; `--part i/n` does the same for independent jobs.

    \b
    Examples:
      cachekd precompute --store runs/tokens --teacher runs/teacher-llama --teacher runs/teacher-gpt2 -o runs/cache
      # Baby Llama's ensemble as one exact teacher
      cachekd precompute --store runs/tokens --teacher A --teacher B --ensemble logits -o runs/cache-ens
    """
    from cachekd.precompute import PrecomputeConfig, precompute

    cfg = PrecomputeConfig(
        store=store, teachers=list(teachers), output=output, top_k=top_k, full=full, temperatures=temperatures,
        sample=sample, proposal_temperature=proposal_temperature, sample_seed=sample_seed, ensemble=ensemble,
        ensemble_weights=ensemble_weights, factored=factored, factored_dtype=factored_dtype,
        factored_rounding=factored_rounding, factored_rank=factored_rank, factored_fit_windows=factored_fit_windows,
        factored_fit_seed=factored_fit_seed,
        splits=splits, batch_size=batch_size, device=device, dtype=dtype,
        registry=registry, part=part, logprob_step=logprob_step,
    )
    result = precompute(cfg, force=force, progress=not quiet and not as_json, say=lambda msg: click.echo(msg, err=True))
    if as_json:
        echo_json({k: v for k, v in result.items() if k != "manifest"})
        return
    rate = result["positions_per_s"]
    click.echo(f"Computed {result['positions_computed']} positions in {result['seconds']:.1f} s"
               + (f" ({rate:,.0f} positions/s)" if rate else ""))
    if result["complete"]:
        from cachekd.cache.reader import LogitCache
        from cachekd.cache.summary import cache_summary, summary_text

        click.echo(f"Cache {output} is complete.")
        echo_mapping(summary_text(cache_summary(LogitCache.open(output))))
    else:
        click.echo(f"{result['chunks_remaining']} chunks remain for other parts; run them, then the cache completes.")


@cli.command("verify")
@click.argument("cache", type=click.Path())
@click.option("--store", type=click.Path(), default=None, help="Token store to check against (default: the recorded one).")
@click.option("--recompute", default=0, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="Re-run the teachers on N random windows and report the largest difference.")
@click.option("--repair", is_flag=True,
              help="Mark every damaged chunk for recomputation (remove its done-marker and manifest.json); "
                   "then re-run precompute with the same arguments.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the --recompute windows.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify_command(cache, store, recompute, repair, seed, as_json, quiet):
    """Check a logit cache: every chunk present, readable (checksums match), holding the data written for it and
    computed from the store's tokens, finite, ids in range and unique per row, fingerprints matching the token
    store, and the token store itself (every chunk readable, contents as written); with --recompute N also
    re-run the teachers on N windows and fail beyond the storage tolerance. CACHE may also be a token store,
    checked on its own. Exits 1 when anything is wrong (also after --repair: the cache is complete again once
    precompute has recomputed the marked chunks).

    \b
    Examples:
      cachekd verify runs/cache --recompute 16
      # after a damaged chunk: mark it, then recompute only it
      cachekd verify runs/cache --repair
      cachekd precompute --store runs/tokens --teacher runs/teacher-llama -o runs/cache   # the same arguments
    """
    from cachekd.verify import verify_path
    from cachekd_cli.config_options import option_label

    report = verify_path(cache, store_path=store, recompute=recompute, seed=seed, repair=repair,
                         progress=not quiet and not as_json, label=option_label("verify"))
    if as_json:
        echo_json(report)
    else:
        click.echo(f"Checked {report['chunks_checked']}/{report['chunks_total']} chunks of {cache}.")
        if report.get("checksums") is False and report["kind"] == "token store":
            click.echo("note: this token store was written without checksums (before cachekd added them); its "
                       "contents were compared with the SHA-256 its manifest recorded instead.")
        elif report.get("checksums") is False:
            click.echo("note: this cache was written without checksums (before cachekd added them), so corruption "
                       "that still decodes cannot be detected; precompute it again into a new directory to add them.")
        if "recompute" in report:
            echo_mapping({"recompute": report["recompute"]})
        for p in report["problems"]:
            click.echo(f"problem: {p}")
        rep = report.get("repair")
        if rep is not None:
            marked = rep["marked_for_recompute"]
            if "refused" in rep:
                click.echo(f"repair refused: {rep['refused']}.")
            elif marked or rep.get("removed_damaged_manifest"):
                n = sum(len(c) for c in marked.values())
                where = "; ".join(f"{s} {', '.join(str(c) for c in cs)}" for s, cs in marked.items())
                if marked:
                    click.echo(f"Marked {n} chunk(s) for recomputation ({where}): removed their done-markers and "
                               f"manifest.json, so the cache now reads as incomplete.")
                else:
                    click.echo("Removed the damaged manifest.json, so the cache now reads as incomplete.")
                click.echo(f"Next: {rep['next']}:")
                click.echo(f"  {rep['command']}")
            else:
                click.echo("Nothing to repair: no damaged chunk.")
        click.echo("OK" if report["ok"] else f"{len(report['problems'])} problem(s) found.")
    if not report["ok"]:
        raise SystemExit(1)
