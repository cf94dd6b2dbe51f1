"""The one exception type for mistakes a user can make (bad recipe, missing file, ...)."""


class LoraCptError(Exception):
    """An error the user can fix. The message names the file, key or value and what to do;
    the CLI prints it on one line and exits non-zero, without a traceback."""


class DamagedFile(LoraCptError, ValueError):
    """A file lora-cpt reads is truncated or corrupt; the message names it and what is wrong. A ValueError too, so
    code that already handles a bad value from a reader handles it the same way."""
