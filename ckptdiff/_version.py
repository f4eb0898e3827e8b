"""The package version, in a module of its own so that any part of ckptdiff can name it
without importing the package front door (which re-exports the public API)."""

__version__ = "0.1.0"
