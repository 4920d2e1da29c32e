from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from cachekd_cli.common import echo_json, echo_mapping, exit_interrupted
from cachekd_cli.config_options import user_text
from cachekd_cli.main import cli

from cachekd.config import PRESET_DIR

COHORT_EXAMPLES = PRESET_DIR / "cohorts"
"""Shipped cohort examples, found by name with -c."""


def _load(config: str, output: str | None, max_steps: int | None, overrides: tuple[str, ...],
          store: str | None = None, cache: str | None = None):
    from cachekd.cohort.config import load_cohort_config
    from cachekd.config import deep_merge, load_yaml, parse_overrides

    path = Path(config)
    if not path.exists() and (COHORT_EXAMPLES / f"{config.removesuffix('.yaml')}.yaml").exists():
        path = COHORT_EXAMPLES / f"{config.removesuffix('.yaml')}.yaml"
    if not path.exists():
        shipped = ", ".join(sorted(p.stem for p in COHORT_EXAMPLES.glob("*.yaml")))
        raise click.UsageError(f"cohort config {config!r} not found: give a YAML file or a shipped example ({shipped}).")
    data = load_yaml(path)
    extra: dict[str, Any] = {}
    if output:
        extra["output"] = output
    if max_steps is not None:
        extra["optim"] = {"max_steps": max_steps}
    if store is not None:
        extra["data"] = {"store": store}
    if cache is not None:
        extra["cache"] = cache
    data = deep_merge(deep_merge(data, extra), parse_overrides(overrides))
    cohort = load_cohort_config(data)
    if not cohort.output:
        raise click.UsageError("no cohort directory given: pass --output or set output in the cohort config.")
    return cohort


@cli.group("cohort", invoke_without_command=True)
@click.option("-c", "--config", default=None, help="Cohort YAML (a file, or a shipped example: cohort-choobaca-grid, "
              "cohort-wml-tiny, ...).")
@click.option("-o", "--output", default=None, help="Cohort directory (output); the peers' runs go to OUTPUT/peers/NAME.")
@click.option("--store", default=None, help="Token store the peers read (data.store), as `cachekd prepare` wrote it.")
@click.option("--cache", default=None, help="Logit cache of that store (cache): the distilling peers of a grid and "
              "the fixed peers read it.")
@click.option("--max-steps", type=int, default=None, help="Stop every peer after N optimizer steps (optim.max_steps).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a cohort value, e.g. --set mutual.alpha=0.3 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue the cohort (every peer, ω and the random streams) from its "
              "last checkpoint.")
@click.option("--force", is_flag=True, help="Replace an existing cohort in --output (its peers' runs too).")
@click.option("--json", "as_json", is_flag=True, help="Print the cohort summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def cohort_command(ctx, config, output, store, cache, max_steps, overrides, resume, force, as_json, quiet):
    """Train N students in one loop from one stream of windows and cached teacher targets.

    With a `mutual:` section the peers learn from each other (weighted mutual learning, "When Babies Teach
    Babies"), optionally with cached teachers as fixed peers; without one the cohort is a variant grid: N
    independent students (each its own objective, temperature, α schedule, shape) from one read and decode of the
    store and the cache. Each peer is an ordinary run in OUTPUT/peers/NAME (`cachekd eval` and `cachekd compare`
    take it); OUTPUT/metrics.jsonl records ω, and `cachekd compare OUTPUT` plots it.

    \b
    Examples:
      cachekd cohort -c cohort-wml-tiny --store runs/tokens -o runs/wml
      cachekd cohort -c cohort-choobaca-grid --store runs/tokens --cache runs/cache -o runs/grid
      cachekd cohort search -c cohort-search-tiny --store runs/tokens -o runs/search
    """
    if ctx.invoked_subcommand is not None:
        return
    if not config:
        raise click.UsageError("give the cohort config with -c FILE (see `cachekd cohort --help`).")
    from cachekd.cohort.run import run_cohort
    from cachekd.trainer import DiskFull, TrainingInterrupted

    cohort = _load(config, output, max_steps, overrides, store, cache)
    try:
        summary = run_cohort(cohort, resume=resume, force=force, progress=not quiet and not as_json,
                             say=lambda msg: click.echo(user_text(msg, "cohort"), err=True))
    except TrainingInterrupted as e:
        exit_interrupted(e, "checkpoints saved. Continue with the same command and --resume.")
    except DiskFull as e:
        msg = e.message("with the same command and --resume")
        raise click.ClickException(msg[0].upper() + msg[1:]) from None
    if as_json:
        echo_json(summary)
        return
    click.echo(f"Finished {summary['steps']} steps of {len(summary['peers'])} peers in {summary['wall_s']:.1f} s; "
               f"runs in {cohort.output}/peers/")
    echo_mapping({k: v for k, v in summary.items() if v is not None and k != "peer_dirs"})


@cohort_command.command("search")
@click.option("-c", "--config", required=True, help="Cohort YAML with a `search:` section.")
@click.option("-o", "--output", default=None, help="Directory of the search (OUTPUT/search/...).")
@click.option("--store", default=None, help="Token store the candidates train on (data.store).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a cohort value (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def search_command(config, output, store, overrides, as_json, quiet):
    """Peer search: successive halving over a seeded random pool of LLaMA shapes (layers, heads, hidden size)
    within a parameter range; keeps the `search.keep` best by dev loss (distinct shapes). Resumable: run the same
    command again after an interruption. Writes OUTPUT/search/search.json.
    """
    from cachekd.cohort.run import run_search

    cohort = _load(config, output, None, overrides, store)
    result = run_search(cohort, progress=not quiet and not as_json, say=lambda msg: click.echo(msg, err=True))
    if as_json:
        echo_json(result)
        return
    click.echo(f"Searched {result['space_size']} shapes' pool in {len(result['rungs'])} rungs "
               f"({result['steps_spent']} steps); best:")
    for b in result["best"]:
        click.echo(f"  {b['shape']:20s} dev loss {b['dev_loss']:.4f}  model: {b['model']}")
