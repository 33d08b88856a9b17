"""The one exception type users see: its message is printed alone by the CLI."""


class SelftuneError(Exception):
    """An error the user can act on; the CLI prints the message without a traceback."""

    exit_code = 1


class UsageError(SelftuneError):
    """Bad flags or config values (exit code 2, like argparse)."""

    exit_code = 2
