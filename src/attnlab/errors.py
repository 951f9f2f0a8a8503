"""The one exception type that the command line reports as a single line, without a traceback."""


class UserError(Exception):
    """Bad input from the user: a config value, a model name, a file. Reported in one line."""
