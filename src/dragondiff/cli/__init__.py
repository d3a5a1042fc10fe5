"""Command line: `dragondiff move|drag|appearance|paste|run|batch|info|demo|bench|ui|convert-ip-adapter`.

Exit codes: 0 done; 2 bad usage or input (named in the message, found before any model work where possible),
an output that cannot be written included; 1 a failure while running (or, for `batch`, any failed sample);
130 interrupted by Ctrl-C (SIGINT), 143 stopped by SIGTERM: the edit in progress leaves no file behind (neither
its temporary files nor a result without its sidecar) and the command says what finished. Errors go to stderr
without a traceback unless --debug is given.
"""

from __future__ import annotations

import signal
import sys
import traceback
import warnings
from pathlib import Path

import click

from . import signals
from ..errors import InputNote
from .signals import Terminated

# Only light modules above: the commands (torch, diffusers: seconds to import) are imported by `main` once its
# signal handlers are in place, so that Ctrl-C or SIGTERM during start-up stops the command with 130/143 too.


def __getattr__(name):
    """`dragondiff.cli.cli`, the command group, imported when first asked for."""
    if name == "cli":
        from .commands import cli

        return cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PACKAGE = Path(__file__).resolve().parent.parent
# click >= 8.2 shows a command's help for no arguments by raising this usage error (exit 2 by default)
NO_ARGS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Our warnings (an input converted, a prompt cut) print as one 'note:' line, not as Python's file:line report;
    other libraries' warnings (deprecations inside the hub client, ...) are not the user's business (--debug shows
    them)."""
    if issubclass(category, InputNote) or Path(filename).resolve().is_relative_to(PACKAGE):
        if str(message) not in _NOTES_SHOWN:  # the pre-check and the edit both read the inputs: one note each
            _NOTES_SHOWN.add(str(message))
            click.echo(f"note: {message}", err=True)


_NOTES_SHOWN: set[str] = set()  # notes printed by this command (emptied when main() starts)


INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)


def _interrupted(e: BaseException) -> int:
    if isinstance(e, Terminated):
        click.echo("terminated (SIGTERM)", err=True)
        return 128 + signal.SIGTERM
    click.echo("interrupted (Ctrl-C)", err=True)
    return 128 + signal.SIGINT


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _NOTES_SHOWN.clear()
    if not debug:
        warnings.showwarning = _show_warning
    with signals.handled():
        try:
            code = _main(argv, debug)
            if signals.received() is not None and code not in INTERRUPTED:
                # its exception was dropped (raised in a finalizer) and the command went on: say it was stopped
                return _interrupted(signals.stop_exception(signals.received()))
            return code
        except KeyboardInterrupt as e:  # outside click's own handling
            return _interrupted(e)


def _main(argv: list[str], debug: bool) -> int:
    try:
        # A signal while torch and the commands import waits for them (about 3 s): an exception raised inside
        # torch's start-up can abort the process (exit -6, seen once in 100 tries); it is raised right after.
        with signals.deferred():
            from .commands import cli
        signals.check()
        cli.main(args=argv, prog_name="dragondiff", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:  # --help, --version
        return e.exit_code
    except NO_ARGS_HELP as e:  # `dragondiff` or `dragondiff move` alone: the help is what was asked for
        click.echo(e.ctx.get_help() if e.ctx is not None else cli.get_help(click.Context(cli)))
        return 0
    except click.ClickException as e:  # usage errors and our InputError: exit 2
        if debug:
            traceback.print_exc()
        e.show()
        return e.exit_code
    except click.exceptions.Abort as e:  # click's form of KeyboardInterrupt (and of EOF at a prompt)
        if isinstance(e.__cause__, KeyboardInterrupt):
            return _interrupted(e.__cause__)
        click.echo("aborted", err=True)
        return 1
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except (ValueError, TypeError, FileNotFoundError) as e:  # the engine's named input errors
        if debug:
            traceback.print_exc()
        click.echo(f"Error: {e}", err=True)
        return 2
    except Exception as e:  # noqa: BLE001 (a runtime failure: report it in one line)
        if debug:
            traceback.print_exc()
        hint = "" if debug else "  (--debug shows the traceback)"  # with --debug it was just printed
        click.echo(f"Error: {type(e).__name__}: {e}{hint}", err=True)
        return 1
