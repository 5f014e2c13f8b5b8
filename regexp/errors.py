"""The one exception type that the CLI turns into a single clear line and a non-zero exit."""


class ConfigError(ValueError):
    """Bad user input: a key, value or file. The message names it and what would be valid."""
