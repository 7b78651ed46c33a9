"""The command line's parts: shared options and error handling, and the inspection sub-commands."""
