"""The one exception type for mistakes a user can fix.

Library code raises `UserError` with a single line that says what is wrong, which key or
file, and what is allowed. Entry points catch it, print ``error: <message>`` and exit 2, so
a user never sees a traceback for a bad config or a missing file.
"""


class UserError(ValueError):
    """A one-line, user-facing error (bad config key, missing file, mismatched adapter)."""
