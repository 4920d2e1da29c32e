from __future__ import annotations

import click

from cachekd_cli.common import comma_list, echo_json
from cachekd_cli.main import cli


@cli.command("audit")
@click.argument("cache", type=click.Path())
@click.option("--teacher", default=None, help="Teacher checkpoint to re-run (default: the one the cache records).")
@click.option("--student", default=None, help="Student checkpoint for the gradient angles (default: random logits).")
@click.option("--positions", default=512, show_default=True, type=int, help="About this many positions to audit.")
@click.option("--store", default=None, type=click.Path(), help="Token store (default: the one the cache records).")
@click.option("--objective", default="forward_kl", show_default=True, help="Objective of the gradients compared.")
@click.option("--temperatures", default=None, help="Comma-separated τ (default: the cache's).")
@click.option("--top-k", default=64, show_default=True, type=int, help="k of the simulated top-k options.")
@click.option("--sample", default=50, show_default=True, type=int, help="N of the simulated sampled options.")
@click.option("--hybrid-top-k", default=16, show_default=True, type=int, help="Exact top-K of the simulated hybrid.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the positions drawn.")
@click.option("--json", "as_json", is_flag=True)
def audit_command(cache, teacher, student, positions, store, objective, temperatures, top_k, sample, hybrid_top_k,
                  seed, as_json):
    """Measure how faithful a cache's targets are: re-run the teacher on sampled positions and report, for the
    cache's own targets and for simulated alternatives (top-k bucket, top-k renormalize, sampled N, hybrid top-K +
    sampled N) built from the same full logits: the captured teacher mass, KL(full ‖ reconstructed target) and the
    angle between the student-logit gradient of the loss against that target and against the full target.

    \b
    Example:
      cachekd audit runs/cache --positions 1024 --student runs/student/model
    """
    from cachekd.audit import AuditOptions, audit
    from cachekd.errors import CachekdError
    from cachekd.kd_options import OBJECTIVES

    if objective not in OBJECTIVES:
        raise click.UsageError(f"--objective must be one of {', '.join(OBJECTIVES)} (got {objective!r}).")
    for flag, v in (("--top-k", top_k), ("--sample", sample), ("--hybrid-top-k", hybrid_top_k)):
        if v < 1:
            raise click.UsageError(f"{flag} must be at least 1 (got {v}).")
    temps = None if temperatures is None else comma_list(temperatures, "--temperatures", float, "numbers")
    try:
        report = audit(cache, teacher=teacher, student=student, positions=positions, store_path=store, seed=seed,
                       temperatures=temps, options=AuditOptions(top_k=top_k, sample=sample,
                                                                hybrid_top_k=hybrid_top_k, objective=objective))
    except ValueError as e:  # an invalid KD setting from the losses' own checks
        if isinstance(e, CachekdError):
            raise
        raise click.UsageError(str(e)) from None
    if as_json:
        echo_json(report)
        return
    click.echo(f"Audit of {report['cache']} ({report['storage_kind']}, {report['bytes_per_position']} B/position): "
               f"{report['positions']} {report['split']} positions, teacher {report['teacher']}"
               + ("" if report["teacher_matches_cache"] else " (NOT the checkpoint the cache was built from)")
               + f", student: {report['student']}, objective {report['objective']}")
    click.echo(f"{'option':44s} {'τ':>4s} {'mass':>7s} {'KL(full‖r)':>11s} {'angle°':>7s}")
    for name, per_tau in report["options"].items():
        for tau, m in per_tau.items():
            click.echo(f"{name:44s} {tau:>4s} {m['captured_mass']:7.3f} {m['kl_full_to_target']:11.4f} "
                       f"{m['grad_angle_deg']:7.2f}")
