"""Commands and groups that refuse an option given twice (click keeps the last value silently)."""

from __future__ import annotations

import click


def refuse_repeated_options(command: click.Command, ctx: click.Context, args: list[str]) -> None:
    """Refuse an option given more than once unless it collects its values (`multiple`, `count`): click keeps the
    last value silently, so `--temperatures 1 --temperatures 2` would cache τ=2 only. A plain flag (`--quiet`)
    repeated loses nothing and may repeat; one with an off switch (`--x/--no-x`) may not. The arguments are scanned
    by the command's own parser (strings only, nothing converted); a group's scan stops at its subcommand's name."""
    if ctx.resilient_parsing:
        return
    try:
        _, _, order = command.make_parser(ctx).parse_args(args=list(args))
    except click.UsageError:
        return  # the real parse says what is wrong
    counts: dict[click.Option, int] = {}
    for param in order:
        if isinstance(param, click.Option) and not (param.multiple or param.count or
                                                    (param.is_flag and not param.secondary_opts)):
            counts[param] = counts.get(param, 0) + 1
    for param, n in counts.items():
        if n > 1:
            raise click.UsageError(
                f"{max(param.opts, key=len)} is given {n} times; give it once, as only the last value would count"
                f" (an option that takes several values takes them comma-separated).", ctx)


class SingleOptionsCommand(click.Command):
    """A command that refuses an option given twice (`refuse_repeated_options`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_repeated_options(self, ctx, args)
        return super().parse_args(ctx, args)


class SingleOptionsGroup(click.Group):
    """A group (`cachekd cohort`) that refuses its own options given twice, and whose commands do too."""

    command_class = SingleOptionsCommand

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_repeated_options(self, ctx, args)
        return super().parse_args(ctx, args)


SingleOptionsGroup.group_class = SingleOptionsGroup
