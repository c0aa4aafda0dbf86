"""The package version, read from the installed metadata: pyproject.toml is the one place it is written."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deepdigits")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
