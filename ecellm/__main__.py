"""`python -m ecellm SUBCOMMAND ...`: the `ecellm` command (see `ecellm.cli`)."""

from .cli import main

main()
