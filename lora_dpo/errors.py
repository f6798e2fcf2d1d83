"""The one exception type for user errors.

Anything the user can fix (a recipe key, a file, a data row, a model path) raises `LoraDpoError` with a message
that names the culprit and says what to do. The CLI turns it into one line on stderr and exit code 2.
"""


class LoraDpoError(Exception):
    """A problem with the user's input. The message names the key/file/row and the fix."""
