"""The one exception type deepdigits raises for anything a user can fix."""


class DeepDigitsError(Exception):
    """A problem with the user's input, files or setup, explained in one line.

    The CLI prints the message as ``deepdigits: error: <message>`` and exits non-zero;
    library users can catch it to tell their mistakes from bugs.
    """


class DataError(DeepDigitsError):
    """A data file is missing, damaged or not what it claims to be."""


class BundleError(DeepDigitsError):
    """A model bundle is missing, damaged or does not match this version of deepdigits."""
