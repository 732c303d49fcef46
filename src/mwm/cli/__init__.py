"""The `mwm` command line (typer + rich)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import __version__
from . import data as data_cmds
from . import importance as importance_cmds
from . import prompts as prompts_cmds
from . import vlm as vlm_cmds
from .bench import bench
from .demo import demo
from .detect import detect
from .finetune import finetune
from .localize_eval import localize_eval
from .localize import localize
from .localize_tune import localize_tune
from .localize_robustness import localize_robustness
from .pretrain import pretrain
from .segment import segment

app = typer.Typer(name="mwm", help="Guided masked image modeling for medical images (Mask What Matters and friends).",
                  no_args_is_help=True, pretty_exceptions_show_locals=False,
                  rich_markup_mode=None)  # option help writes "[default: …]" literally; markup would eat it
app.add_typer(data_cmds.app, name="data")
app.add_typer(vlm_cmds.app, name="vlm")
app.add_typer(prompts_cmds.app, name="prompts")
app.add_typer(importance_cmds.app, name="importance")
app.command()(localize)
app.command()(demo)
app.command("localize-eval")(localize_eval)
app.command("localize-tune")(localize_tune)
app.command("localize-robustness")(localize_robustness)
app.command()(pretrain)
app.command()(finetune)
app.command()(segment)
app.command()(detect)
app.command()(bench)


def _version(value: bool) -> None:
    if value:
        print(f"mwm {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                          help="Print the version and exit.")] = None) -> None:
    """Guided masked image modeling for medical images."""


__all__ = ["app"]
