"""The one exception type that means "the user asked for something we cannot do"."""

from __future__ import annotations

import re

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class InputError(ValueError):
    """Bad input from the user: a config value, a file, a path.

    The message is one line that names the problem and says what to do; the CLI
    prints it as is and exits with code 2.

    A message may name settings by placeholder, ``{key}``, with ``names`` giving each
    one's spelling in the library (``depth_m``, ``allow_extrapolation=True``). Whoever
    shows the message to a user in other terms (the CLI: ``--depth``) calls
    :meth:`render` with its own spellings; nothing else is rewritten.
    """

    def __init__(self, message: str, names: dict[str, str] | None = None):
        self.template = message
        self.names = dict(names or {})
        super().__init__(self.render())

    def render(self, spellings: dict[str, str] | None = None) -> str:
        """The message with each ``{key}`` spelled by ``spellings``, else by the library's own name."""
        words = {**self.names, **(spellings or {})}
        if not self.names:  # a plain message: braces in it are text
            return self.template
        return _PLACEHOLDER.sub(lambda m: words.get(m.group(1), m.group(0)), self.template)

    @classmethod
    def for_key(cls, key: str, problem: str) -> InputError:
        """``config key 'key' <problem>``; the CLI names the option instead when the user typed one."""
        return cls("{" + key + "} " + problem, {key: f"config key '{key}'"})

    @classmethod
    def for_keys(cls, template: str, *keys: str) -> InputError:
        """A message naming several config keys by placeholder: the first as ``config key 'k'``, the rest as ``k``."""
        return cls(template, {k: (f"config key '{k}'" if i == 0 else k) for i, k in enumerate(keys)})

    def __reduce__(self):  # picklable across DataLoader workers and processes
        return (type(self), (self.template, self.names))


def os_reason(exc: BaseException) -> str:
    """An OSError's (or a library's) reason in one short line: HDF5 appends lines of diagnostics to its own."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


class DamagedFile(InputError):
    """A file of ours whose structure is broken (a dataset missing, an index out of range)."""
