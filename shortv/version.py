"""The package's version (as in pyproject.toml), in a module of its own so that any module
can name it without importing the whole public API (`shortv/__init__.py`)."""

__version__ = "0.1.0"
