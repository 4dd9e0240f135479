"""`argen chat` (placeholder)."""


def add_arguments(p) -> None:
    pass


def run(args) -> int:
    return 0
