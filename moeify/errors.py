"""The one error type users see."""


class MoeifyError(Exception):
    """A failure the user can act on: the message says what is wrong and what to do.

    Library code raises it; only the CLI turns it into an exit code.
    """
