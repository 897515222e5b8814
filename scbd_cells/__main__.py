"""Entry point for ``python -m scbd_cells`` (and ``torchrun -m scbd_cells train ...``)."""

from scbd_cells.cli import main

if __name__ == "__main__":
    main()
