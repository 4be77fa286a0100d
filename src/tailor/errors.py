"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class TailorError(Exception):
    """A problem the user can fix: the message names the file and line, the key, or the field."""

    exit_code = 1
