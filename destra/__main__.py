"""``python -m destra``: the same as the ``destra`` console script."""

from destra.cli import main

main()
