"""The one exception type that means "the user asked for something we cannot do"."""


class InputError(ValueError):
    """Bad input from the user: a config value, a file, a path.

    The message is one line that names the problem and says what to do; the CLI
    prints it as is and exits with code 2.
    """


class DamagedFile(InputError):
    """A file of ours whose structure is broken (a dataset missing, an index out of range)."""
