"""Subcommands of ``stmixer-ckpt``; each module exposes ``register(subparsers)``."""
