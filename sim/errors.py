"""The project's user-facing error: one clear message, no traceback, exit code 2 at the CLI."""


class PalsError(Exception):
    """Bad input or an impossible request, explained in one message that names file, field or line."""
