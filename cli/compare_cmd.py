from __future__ import annotations

from pathlib import Path

import click

from cachekd_cli.common import echo_json
from cachekd_cli.main import cli


@cli.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Directory for compare.md, compare.csv and the plots [default: <runs' parent>/compare]; an earlier "
                   "comparison's files there are replaced (and said so).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows and file paths as JSON.")
def compare_command(runs, out_dir, as_json):
    """Compare runs in one table (steps, tokens, wall time, dev loss and perplexity, minimal-pair accuracy per
    group) and plot their training and dev curves, at equal steps and at equal wall-clock time. Minimal-pair
    accuracies get a column per way they were measured (pair set, --prefix, --max-pairs), e.g.
    mp[blimp prefix=eos]: numbers measured differently never share a column.

    RUNS are output directories of `cachekd train` / `cachekd distill` (a `cachekd cohort` directory stands for
    its peers' runs, and its peer weights ω are plotted in weights.png); run `cachekd eval RUN ...` first to add
    minimal-pair accuracies (saved as RUN/eval.json). The dev loss is `cachekd eval`'s over the whole dev split when
    there is one, else the trainer's own (column dev_from says which); a run without a summary is "(running)" while
    a process trains it and "(unfinished)" otherwise.

    \b
    Example:
      cachekd compare runs/ce runs/kd-forward runs/kd-reverse --out runs/compare
    """
    from cachekd.compare import compare_runs
    from cachekd.report import format_table

    result = compare_runs(list(runs), out_dir)
    if as_json:
        echo_json(result)
        return
    click.echo(format_table(result["rows"], result["columns"]))
    files = result["files"]
    click.echo("")
    if result["replaced"]:
        click.echo(f"Replaced the earlier comparison in {result['out']} ({', '.join(result['replaced'])}).")
    click.echo(f"Markdown table: {files['markdown']}")
    click.echo(f"CSV:            {files['csv']}")
    click.echo(f"Curves:         {files['curves']}")
    if files.get("weights"):
        click.echo(f"Cohort ω plot:  {files['weights']}")
    if files.get("accuracy_by_group"):
        click.echo(f"Accuracy plots: {files['accuracy_by_group']}, {files['accuracy_by_file']}")
    else:
        click.echo("No minimal-pair results in these runs (run `cachekd eval RUN --minimal-pairs ...` to add them).")
