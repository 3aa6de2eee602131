"""The ``neuroinit`` command line: parsing and printing only; the work lives in the library."""

from __future__ import annotations

import functools
import json
import sys

import click

from neuroinit._util import json_safe
from neuroinit.profiles import ProfileError


def fail_cleanly(func):
    """Turn library errors into one line on stderr and a non-zero exit (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            out = func(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, not at exit
            return out
        except BrokenPipeError:
            _end_quietly_on_broken_pipe()
        except (ProfileError, ValueError, FileNotFoundError, OSError, KeyError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise click.ClickException(str(msg).splitlines()[0] if str(msg) else type(e).__name__) from None

    return wrapper


def _end_quietly_on_broken_pipe() -> None:
    """The reader of stdout went away (``neuroinit show run.h5 | head -1``): stop without a message, as a
    command killed by SIGPIPE does (exit status 141); stdout goes to /dev/null so the exit flush is silent."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


def _check_out_dir(out: str, option: str = "--out") -> None:
    """Output files go into existing directories only (a typo in a path is an error, not a new directory)."""
    import os

    parent = os.path.dirname(out)
    if parent and not os.path.isdir(parent):
        raise click.ClickException(f"Invalid {option} {out!r}: directory {parent!r} does not exist; create it "
                                   "first or give another path")


def _note_missing_fused(reason: str | None) -> None:
    """One line on stderr when the fused native step cannot run here (no compiler, a broken CC, ...)."""
    click.echo(f"note: the fused native step is unavailable ({reason}); the PyTorch step runs instead (the "
               "same results to float32 rounding, several times slower; benchmarks/ has the measured ratio)", err=True)


def echo_json(obj) -> None:
    click.echo(json.dumps(json_safe(obj), indent=2, sort_keys=True, default=float))


class _OneLineUsageError(click.ClickException):
    """A bad option value as one line ("Error: Invalid value for '--model': ...") with the usage exit code 2,
    instead of click's usage text + hint + error (the CLI contract: one clear line, no traceback)."""

    exit_code = 2


class OneLineErrorsCommand(click.Command):
    """A click command whose usage errors are one line on stderr (exit code 2)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            raise _OneLineUsageError(e.format_message().splitlines()[0]) from None


@click.group()
@click.version_option(package_name="neuroinit")
def main() -> None:
    """neuroinit: initial connectivity, local learning and chip deployment for rate and spiking RNNs."""


# the command modules register their commands on ``main``; their names stay reachable here
from neuroinit.cli.bench import _int_list, bench_command  # noqa: F401
from neuroinit.cli.dynamics import (  # noqa: F401
    alignment_command,
    curvature_command,
    init_command,
    lyapunov_command,
)
from neuroinit.cli.export import export_command  # noqa: F401
from neuroinit.cli.profiles import _profile_summary, profiles_group, profiles_list, profiles_show  # noqa: F401
from neuroinit.cli.sweep import _gain_list, plot_command, sweep_command  # noqa: F401
from neuroinit.cli.train import (  # noqa: F401
    compare_command,
    show_command,
    train_command,
)
