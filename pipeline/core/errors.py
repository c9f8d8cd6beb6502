"""The two failures a user can fix, each reported as one line (see `pipeline.cli.stage`)."""


class UserError(RuntimeError):
    """A failure the user can fix (missing file, unreachable server, ...): one clear line."""


class ConfigError(ValueError):
    """A parameter problem, phrased as one line that names the dotted key."""


class InterruptError(UserError):
    """The user stopped a stage (Ctrl-C, SIGTERM): one line saying how to continue."""

    exit_code = 130  # the shell's code for a command ended by SIGINT
