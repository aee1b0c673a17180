"""The one exception type for user mistakes.

The CLI prints a ``LorasumError`` as a single line (no traceback) and exits with code 2.
Anything else is a bug and keeps its traceback.
"""


class LorasumError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""


def raise_all(problems: list[str], what: str) -> None:
    """Raise one ``LorasumError`` listing every problem, if there are any."""
    if problems:
        if len(problems) == 1:
            raise LorasumError(f"{what}: {problems[0]}")
        raise LorasumError(f"{what}: " + "; ".join(problems))
