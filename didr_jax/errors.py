"""Input errors that the CLIs report as one line (exit code 2) instead of a traceback."""


class ConfigError(ValueError):
  """A config field with an invalid value; the message starts with ``config.<field>:``."""
