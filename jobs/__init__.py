"""Ray entry points: each module has ``main(argv)`` and runs as ``python -m jobs.<name>``."""
