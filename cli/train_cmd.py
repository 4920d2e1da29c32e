from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import click
from cachekd_cli.common import echo_json, echo_mapping, exit_interrupted
from cachekd_cli.config_options import ConfigCommand, user_text
from cachekd_cli.main import cli


def _params(mode: str) -> list[click.Parameter]:
    """The options of `cachekd train` (mode "train") or `cachekd distill`: those that set a config value are
    generated from the config tree (config_options)."""
    from cachekd_cli.config_options import DISTILL_OPTIONS, TRAIN_OPTIONS, config_options

    params = [
        click.Option(["-c", "--config"], default=None,
                     help="YAML config file or the name of a shipped preset (see `cachekd presets`)."),
        *config_options(TRAIN_OPTIONS),
        click.Option(["--set", "overrides"], multiple=True, metavar="KEY=VALUE",
                     help="Override any config value, e.g. --set optim.weight_decay=0.1 (repeatable)."),
        click.Option(["--resume"], is_flag=True, help="Continue the run in --output from its last checkpoint (a run "
                     "stopped before its first checkpoint starts again from step 0)."),
        click.Option(["--force"], is_flag=True, help="Replace an existing run in --output: removes what cachekd "
                     "wrote there (model/, checkpoints/, metrics, summary, eval.json, ...) and keeps any other file."),
        click.Option(["--json", "as_json"], is_flag=True, help="Print the run summary as JSON."),
        click.Option(["--quiet"], is_flag=True, help="No progress bar."),
    ]
    if mode == "distill":
        params += [*config_options(DISTILL_OPTIONS),
                   click.Option(["--teacher", "online_teachers"], multiple=True,
                                help="With --online: teacher checkpoints (default: the cache's).")]
    return params


def _continue_command(ctx: click.Context) -> str:
    """The command line that continues this run: the options given, less --force, plus --resume."""
    words = ["cachekd", ctx.info_name or "train"]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in ("force", "resume"):
            continue
        if ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE:
            continue
        opt = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        value = ctx.params[param.name]
        if param.is_flag:
            if value:
                words.append(opt)
            continue
        for v in (value if param.multiple else [value]):
            words += [opt, str(v)]
    words.append("--resume")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        n = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
        return (f"your torchrun command with --resume added, e.g. "
                f"{shlex.join(['torchrun', '--nproc-per-node', n, '-m', 'cachekd_cli', *words[1:]])}")
    return shlex.join(words)


def _interrupted_message(ctx: click.Context, out: str) -> str:
    """Why a run stopped by an interrupt (not at a step boundary) can go on, from what its directory holds."""
    from cachekd.rundir import run_state

    st = run_state(out)
    cont = _continue_command(ctx)
    if not st["is_run"]:
        return "Interrupted before the run started; nothing was written. Run the same command again."
    if st["finished"]:
        return f"Interrupted after the run finished; its model and summary are in {out}."
    if st["last_checkpoint_step"] is None:
        return f"Interrupted before the first checkpoint was saved; start the run again from step 0 with: {cont}"
    return (f"Interrupted; the last checkpoint in {out} is at step {st['last_checkpoint_step']}; continue from there "
            f"with: {cont}")


def _human(v: Any) -> str:
    """A summary value for people: rounded numbers, lists joined (--json keeps the exact values)."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return str(v)


def _run(kw: dict[str, Any], mode: str) -> None:
    """Resolve the config (file or preset, then the options, then --set) and run it."""
    from cachekd.config import deep_merge, load_yaml, parse_overrides
    from cachekd.train_config import load_train_config
    from cachekd_cli.config_options import overrides_from_options

    ctx = click.get_current_context()
    options = overrides_from_options(kw, ctx.command.params)
    teachers = kw.get("online_teachers")
    if teachers and not kw.get("online"):
        raise click.UsageError("--teacher is for --online runs; a cached run picks teachers with --teachers.")
    if teachers:
        options["distill"]["teachers"] = list(teachers)
    data = load_yaml(kw["config"]) if kw["config"] else {}
    data = deep_merge(data, options)
    data = deep_merge(data, parse_overrides(kw["overrides"]))
    if mode == "train":
        if data.get("distill") is not None:
            raise click.UsageError("this config has a distill section; run it with `cachekd distill`, or add "
                                   "`--set distill=null` to train it with plain cross-entropy.")
    elif data.get("distill") is None:
        data["distill"] = {}
    cfg = load_train_config(data)
    if not cfg.data.store:
        raise click.UsageError("no token store given: pass --store or set data.store in the config.")
    if not cfg.output:
        raise click.UsageError("no run directory given: pass --output or set output in the config.")
    from cachekd.trainer import DiskFull, TrainingInterrupted, run  # (torch: only once the config is valid)

    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        summary = run(cfg, resume=kw["resume"], force=kw["force"], progress=not kw["quiet"] and not kw["as_json"],
                      say=lambda msg: click.echo(user_text(msg, mode), err=True))
    except TrainingInterrupted as e:
        exit_interrupted(e, f"checkpoint saved to {e.checkpoint}. Continue with: {_continue_command(ctx)}")
    except DiskFull as e:
        msg = e.message(f"with: {_continue_command(ctx)}")
        raise click.ClickException(msg[0].upper() + msg[1:]) from None
    except KeyboardInterrupt:
        if main_rank:
            click.echo("\n" + _interrupted_message(ctx, cfg.output), err=True)
        sys.exit(130)
    if kw["as_json"]:
        echo_json(summary)
    else:
        click.echo(f"Finished {summary['steps']} steps in {summary['wall_s']:.1f} s; model saved to {cfg.output}/model")
        echo_mapping({k: _human(v) for k, v in summary.items() if v is not None})


@cli.command("train", cls=ConfigCommand, build_params=lambda: _params("train"))
def train_command(**kw):
    """Train a language model with cross-entropy: a teacher, or the no-distillation baseline.

    Settings come from a YAML config (a file or a preset name), then the options here, then --set overrides; the
    resolved config is saved as RUN/config.yaml. Writes RUN/model (HF format: AutoModelForCausalLM loads it),
    RUN/metrics.jsonl, RUN/summary.json and resumable checkpoints. Ctrl-C stops after the current step with a
    checkpoint there and prints the command (with --resume) that continues. Under
    `torchrun --nproc-per-node N -m cachekd_cli train ...` it runs data-parallel with the same global batch.

    \b
    Example:
      cachekd train -c babyllama-teacher-llama-360m --store runs/tokens -o runs/teacher-llama
    """
    _run(kw, "train")


@cli.command("distill", cls=ConfigCommand, build_params=lambda: _params("distill"))
def distill_command(**kw):
    """Train a student from the logit cache: the teacher is never loaded (unless --online).

    The loss is λ·CE + (1−λ)·τ²·D(teacher, student) with D any of the objectives; ChooBaCa's mixing of teacher and
    student logits and its progressive α are config values (distill.alpha: {kind: epoch_linear, start, end}).
    Ctrl-C stops after the current step with a checkpoint there and prints the command (with --resume) that
    continues; `torchrun --nproc-per-node N -m cachekd_cli distill ...` runs data-parallel.

    \b
    Examples:
      cachekd distill -c babyllama-student-58m --store runs/tokens --cache runs/cache -o runs/student-fkl
      cachekd distill -c choobaca-rkl-1t-mix --store runs/tokens --cache runs/cache -o runs/student-rkl --objective reverse
    """
    _run(kw, "distill")


@cli.command("presets")
@click.option("--show", default=None, help="Print one preset's YAML.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON: [{name, description}, ...].")
def presets_command(show, as_json):
    """List the shipped configs (use them with -c NAME).

    \b
    Examples:
      cachekd presets
      cachekd presets --show tiny-distill-forward
      cachekd presets --json
    """
    from cachekd.config import PRESET_DIR, list_presets, preset_description

    if show:
        from cachekd.config import load_yaml

        load_yaml(show)  # refuses unknown names with the list
        # a YAML file (e.g. RUN/config.yaml) is shown as it is; otherwise the shipped preset of that name
        path = Path(show) if Path(show).is_file() else PRESET_DIR / f"{show.removesuffix('.yaml')}.yaml"
        text = path.read_text()
        if as_json:
            desc = preset_description(show) if path.parent == PRESET_DIR else None
            echo_json({"name": path.stem if path.parent == PRESET_DIR else str(path), "description": desc, "yaml": text})
        else:
            click.echo(text)
        return
    items = [{"name": name, "description": preset_description(name)} for name in list_presets()]
    if as_json:
        echo_json(items)
        return
    for it in items:
        click.echo(f"{it['name']:34s} {it['description']}")
