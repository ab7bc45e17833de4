"""The two ways a run stops on purpose, shared by the library and the scripts.

UsageError: the user's input is wrong (a flag, a path, a config value, a file's contents); the message names it.
    nanolab.run.main prints it as one line and exits 2, with no traceback. It subclasses ValueError, so library
    callers that catch ValueError keep working.
Diverged: the loss, a gradient norm or a metric became NaN/inf; the run stops (exit 1) without saving, so the
    last checkpoint stays good.
"""


class UsageError(ValueError):
    """Bad input from the user: a flag, a path, a config key or value, a file's contents."""


class Diverged(RuntimeError):
    """The loss (or gradient norm, or an eval metric) became NaN or infinite."""
