"""The one exception type for bad user input (config values, data files, checkpoints).

The CLI turns it into a one-line message instead of a traceback. It lives outside `nn/` so that the pure
PyTorch code can raise it without importing Lightning.
"""


class UserInputError(ValueError):
    """A value given by the user is not allowed; the message names the value and what is allowed."""
