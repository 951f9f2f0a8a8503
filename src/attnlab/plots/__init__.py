"""Figures: one function per figure, each reading only a table. Each module's ``render``
draws one of its figures by name (``attnlab plot <figure>``)."""

import matplotlib

from attnlab.errors import UserError

matplotlib.use("Agg")


def needs(figure: str, **options) -> dict:
    """The options a figure takes, as given on the command line; one not given (None)
    raises a one-line UserError naming it."""
    missing = [f"--{name}" for name, value in options.items() if value is None]
    if missing:
        raise UserError(f"figure {figure} needs {', '.join(missing)}")
    return options
