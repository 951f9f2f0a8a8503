"""Figures: one function per figure, each reading only a table. Each module's ``render``
draws one of its figures by name (``attnlab plot <figure>``)."""

from pathlib import Path

import matplotlib

from attnlab.errors import UserError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def needs(figure: str, **options) -> dict:
    """The options a figure takes, as given on the command line; one not given (None)
    raises a one-line UserError naming it."""
    missing = [f"--{name}" for name, value in options.items() if value is None]
    if missing:
        raise UserError(f"figure {figure} needs {', '.join(missing)}")
    return options


def save_figure(fig, out: str | Path) -> None:
    """Write the figure to ``out`` through a temporary file, so a killed job leaves no
    half-written PNG, and close it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
