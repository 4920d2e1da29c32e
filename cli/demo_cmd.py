from __future__ import annotations

import click

from cachekd_cli.common import echo_json
from cachekd_cli.config_options import user_text
from cachekd_cli.main import cli


@cli.command("demo")
@click.option("-o", "--out", "out_dir", default="demo_out", show_default=True, type=click.Path(),
              help="Where everything goes.")
@click.option("--corpus", default=None, type=click.Path(),
              help="Run on this text (file, directory or glob) instead of the built-in grammar corpus.")
@click.option("--small", is_flag=True, help="A reduced size that finishes in about a minute (used by CI).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_command(out_dir, corpus, small, seed, device, as_json, quiet):
    """Run the whole job on a built-in corpus: prepare → train a teacher → precompute its outputs ONCE into the
    default cache and once into a factored cache → beside a cross-entropy baseline, distil a forward-KL student from
    the default cache and a reverse-KL student with mixing and progressive α from the factored one → a mutual-learning
    cohort of two peers with the cached teacher as a fixed peer → evaluate → compare. Re-running resumes.

    \b
    Examples:
      cachekd demo
      cachekd demo --corpus ../shared/data/babylm_like --out demo_babylm
    """
    from cachekd.demo import run_demo
    from cachekd.report import format_table

    say = (lambda s: None) if as_json else (lambda s: click.echo(user_text(s, "demo")))
    result = run_demo(out_dir, corpus=corpus, small=small, seed=seed, device=device, progress=not quiet and not as_json,
                      say=say)
    comp = result["comparison"]
    if as_json:
        echo_json({"rows": comp["rows"], "files": comp["files"], "timings_s": result["timings"],
                   "cohort_weights": result["cohort_weights"]})
        return
    click.echo("")
    click.echo(format_table(comp["rows"], comp.get("columns")))
    pre, fac = result["timings"].get("precompute"), result["timings"].get("precompute factored")
    if pre is not None and fac is not None:
        click.echo(f"\nOne-off precomputes: {pre:.1f} s for the default cache (the forward-KL student), {fac:.1f} s "
                   f"for the factored cache (the reverse-KL student and the cohort's fixed teacher).")
    w = result["cohort_weights"]
    if w:
        click.echo(f"Cohort ω over ({', '.join(w[0]['members'])}): "
                   + " → ".join(f"step {r['step']}: [{', '.join(f'{x:.4f}' for x in r['weights'])}]" for r in w))
    click.echo("\nFiles:")
    for k, v in comp["files"].items():
        click.echo(f"  {k}: {v}")
