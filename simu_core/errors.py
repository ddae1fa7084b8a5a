"""The one error type of the project: every message names the problem and the fix."""


class SimuError(Exception):
    """A problem the user can fix (bad input, missing file, unsupported model...).

    The message says what is wrong and what to do about it; callers show it as is.
    """
