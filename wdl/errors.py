"""User-facing errors.

Anything a user can cause (a bad config, a missing file, malformed data) raises a subclass
of `WdlError` with a one-line message naming the culprit. The CLI prints it as
`error: <message>` and exits with status 2; tracebacks are kept for real bugs.
"""


class WdlError(Exception):
    """Base class of errors caused by user input; the message is one line."""


class ConfigError(WdlError):
    """A config file or override is invalid."""


class DataError(WdlError):
    """A data set, shard or input file is missing, incomplete or malformed."""


class CheckpointError(WdlError):
    """A checkpoint is missing, incomplete or incompatible with the config."""


class TrainingError(WdlError):
    """Training cannot go on meaningfully (e.g. the loss is no longer finite)."""


class ArtefactError(WdlError):
    """An exported model folder (`wdl export`) is missing, incomplete or unreadable."""


def clip(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters, saying how many more there were: what an error line
    quotes of data (a 50 MB field must not make a 50 MB message)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors run to many lines), or its type's
    name when it has none, clipped (library errors quote the values they fail on): what a one-line
    message quotes of a caught error."""
    text = str(e).strip()
    return clip(text.splitlines()[0]) if text else type(e).__name__
