"""The ``liftrec`` command line: parses, wires, starts. No logic lives here.

Each group of verbs is registered from its own ``liftrec/cmd_*.py`` module.
"""

from __future__ import annotations

import importlib

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="liftrec",
    help="Streaming, real-time recommendations for online shops.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Command modules; each defines ``register(app)``.
COMMAND_MODULES = (
    "liftrec.cmd_stack",
    "liftrec.cmd_serve",
    "liftrec.cmd_worker",
    "liftrec.cmd_train",
    "liftrec.cmd_demo",
    "liftrec.cmd_simulate",
    "liftrec.cmd_models",
    "liftrec.cmd_evaluate",
    "liftrec.cmd_experiments",
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Console-script entry point."""
    app()
