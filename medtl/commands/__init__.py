"""Subcommands of the ``medtl`` command line, one module each."""

#: Modules that define ``register(subparsers)``, in the order ``medtl --help`` lists them.
COMMANDS: tuple[str, ...] = (
    "medtl.commands.run",
    "medtl.commands.evaluate",
    "medtl.commands.shift",
    "medtl.commands.compare",
    "medtl.commands.plugins",
    "medtl.commands.plugin_new",
    "medtl.commands.convert",
    "medtl.commands.inspect",
)
