"""The `qdtk` click application: one group, one module per stage, errors as messages.

Each stage's command lives in its own module here and imports the heavy library code inside
the command, so `qdtk --help` stays fast and torch is only imported by `capture`.
"""

from __future__ import annotations

import logging
import sys

import click

from qdtk import __version__
from qdtk.errors import QdtkError, os_error_message

# Commands registered lazily: name -> "module:attribute" inside qdtk.cli.
COMMANDS = {
    "inspect": "qdtk.cli.inspect_cmd:inspect",
    "capture": "qdtk.cli.capture_cmd:capture",
    "quantize": "qdtk.cli.quantize_cmd:quantize",
    "pack": "qdtk.cli.pack_cmd:pack",
    "unpack": "qdtk.cli.pack_cmd:unpack",
    "run": "qdtk.cli.run_cmd:run",
    "eval": "qdtk.cli.eval_cmd:eval_",
    "generate": "qdtk.cli.generate_cmd:generate",
    "report": "qdtk.cli.report_cmd:report",
}


class QdtkGroup(click.Group):
    """Loads subcommands on demand and turns QdtkError into `Error: ...` (exit code 1)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        import importlib

        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name == module:  # stage not built yet
                return None
            raise

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QdtkError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # one the stages did not name: where, what, what to do
            if ctx.meta.get(VERBOSE_KEY, 0) > 0:
                raise
            raise click.ClickException(os_error_message(e)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted; finished outputs are kept, rerun to resume.", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:
            if ctx.meta.get(VERBOSE_KEY, 0) > 0:
                raise  # -v: the full traceback
            raise click.ClickException(unexpected_message(e)) from None


VERBOSE_KEY = "qdtk.verbose"


def unexpected_message(e: BaseException) -> str:
    """One line for an exception qdtk did not anticipate: its type, its first line, the hint."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first} (rerun with -v for the traceback)"


@click.group(cls=QdtkGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qdtk")
@click.option("-v", "--verbose", count=True,
              help="Debug log output, and the full traceback of an unexpected error.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """qdtk: quantize diffusion LLMs to about 2 bits per weight.

    Pipeline: capture (masked calibration statistics) -> quantize (ABMP + DAQ) -> pack
    (bit-packed checkpoint) -> unpack / eval.  `qdtk run` does it all; `qdtk generate`
    samples text from a LLaDA or Dream checkpoint.
    """
    click.get_current_context().meta[VERBOSE_KEY] = verbose
    level = logging.WARNING if quiet else (logging.INFO, logging.DEBUG)[min(verbose, 1)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
