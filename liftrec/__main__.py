"""``python -m liftrec``: the same as the ``liftrec`` console script."""

from liftrec.cli import main

main()
