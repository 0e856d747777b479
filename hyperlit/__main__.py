"""``python -m hyperlit`` runs the command line (see :mod:`hyperlit.cli`)."""

from hyperlit.cli import main

if __name__ == "__main__":
    main()
