"""The one exception type that etrace raises for user errors, and its warning."""


class EtraceError(ValueError):
    """Raised for every user error: the message names the parameter path, primitive
    or shape at fault and says what to do."""


class EtraceWarning(UserWarning):
    """Issued when a parameter is learned with a coarser gradient than its traces
    could give (for example a one-step gradient), so that the choice is visible."""
