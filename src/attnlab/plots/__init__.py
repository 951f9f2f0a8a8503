"""Figures: one function per figure, each reading only a table."""

import matplotlib

matplotlib.use("Agg")
