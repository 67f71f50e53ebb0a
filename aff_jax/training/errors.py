"""The errors a run reports in one line, and the exit status each gives ``python -m train``."""


class RunError(Exception):
    """A problem the user can fix, reported in one line (``error: ...``) with exit status 1.

    The message names what is wrong (a config key, a file, the workdir) and what would be
    valid; ``python -m train`` prints it without a traceback unless ``--verbose``.
    """
    exit_code = 1


class ConfigError(RunError, ValueError):
    """A configuration or dataset problem; the message names the offending config key
    (``config.mesh_shape``, ...)."""


class Diverged(RunError):
    """The loss or the gradients became non-finite; nothing non-finite was checkpointed."""
    exit_code = 3
