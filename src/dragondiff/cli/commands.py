"""The command group: every command of the CLI (imported by `main` once its signal handlers are in place)."""

from __future__ import annotations

import click

from .. import __version__
from .batch import batch
from .edits import TASK_COMMANDS, run
from .misc import bench, convert_ip_adapter, demo, info, ui


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="dragondiff")
def cli():
    """DragonDiffusion drag-style image editing: move, resize, drag, appearance, paste.

    Runs with the bundled shapes model by default (offline, 128 px scenes); pass --model for Stable Diffusion 1.x.
    `dragondiff COMMAND --help` shows every option with its default.
    """


for command in (*TASK_COMMANDS, run, batch, info, demo, bench, ui, convert_ip_adapter):
    cli.add_command(command)
