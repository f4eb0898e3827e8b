"""The Textual app, installed as ``ckptdiff.tui`` (placeholder until the TUI lands)."""
