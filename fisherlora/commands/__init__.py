"""The subcommands of the ``fisherlora`` command, one module each: its ``run(args)`` handler (the
parser, the offline switches and the one-line errors stay in :mod:`fisherlora.cli`)."""
