"""The `mmsearch` command line (Typer + rich). Entry point: `mmsearch.cli.main:app`."""
