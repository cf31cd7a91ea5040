"""The ``tlopt`` command and its groups; the command modules register on them."""

from __future__ import annotations

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Hyperparameter optimisation for staged transfer learning on images.",
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect data sources.")
model_app = typer.Typer(no_args_is_help=True, help="Backbones and stages.")
study_app = typer.Typer(no_args_is_help=True, help="Create, list, show and delete studies.")
storage_app = typer.Typer(no_args_is_help=True, help="Serve the study storage to many workers.")
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
app.add_typer(study_app, name="study")
app.add_typer(storage_app, name="storage")
