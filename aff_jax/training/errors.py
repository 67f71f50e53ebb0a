"""The error a bad training configuration raises."""


class ConfigError(ValueError):
    """A configuration or dataset problem, reported to the user in one line.

    The message names the offending config key (``config.mesh_shape``, ...) and what would be
    valid; ``python -m train`` prints it and exits non-zero without a traceback.
    """
