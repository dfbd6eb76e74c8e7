"""`python -m app` runs the `nexus` command line."""

from app.cli import main

main()
