"""The one exception type for user errors.

Anything the user can fix (a recipe key, a file, a data row, a model path) raises `LoraDpoError` with a message
that names the culprit and says what to do. The CLI turns it into one line on stderr and exit code 2.
"""


class LoraDpoError(Exception):
    """A problem with the user's input. The message names the key/file/row and the fix."""


class TrainingStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a step, and a checkpoint holds it (resume with
    train.resume_from_checkpoint=latest). A KeyboardInterrupt, so a script, a sweep loop or a notebook cell stops
    as it would on any interrupt; `result` is the run so far (the checkpoint's adapter, the metrics logged)."""

    def __init__(self, message: str, result) -> None:
        super().__init__(message)
        self.result = result
