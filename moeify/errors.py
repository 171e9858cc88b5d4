"""The error types users see."""


class MoeifyError(Exception):
    """A failure the user can act on: the message says what is wrong and what to do.

    Library code raises it; only the CLI turns it into an exit code: 2, the input was wrong.
    """

    exit_code = 2


class MoeifyFailure(MoeifyError):
    """The input was fine but the run could not finish: the network, or a change made under our feet.

    Exit code 1, as for OS failures: running again later (or after fixing the machine) may succeed.
    """

    exit_code = 1


class Interrupted(MoeifyError):
    """The user stopped the run (Ctrl-C, SIGTERM); the message says what was kept and how to go on."""

    exit_code = 130  # 128 + SIGINT: the shell's code for a command ended by Ctrl-C
