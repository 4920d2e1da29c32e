"""The one exception type whose message is meant for the user."""


class CachekdError(ValueError):
    """Bad input or state a user can fix. The CLI prints the message (one sentence) and exits non-zero."""
