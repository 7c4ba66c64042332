"""The one exception type for data problems a user can cause and fix."""


class DataError(Exception):
    """A user-fixable data problem (bad path, empty corpus, corrupt files, ...).

    The message is one line naming the problem and the fix; the CLI prints it without a
    traceback.
    """
