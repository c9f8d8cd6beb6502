"""The two failures a user can fix, each reported as one line (see `pipeline.cli.stage`)."""


class UserError(RuntimeError):
    """A failure the user can fix (missing file, unreachable server, ...): one clear line."""


class ConfigError(ValueError):
    """A parameter problem, phrased as one line that names the dotted key."""
