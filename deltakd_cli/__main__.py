"""`python -m deltakd_cli ...` (and so `torchrun -m deltakd_cli ...`)."""

from deltakd_cli.cli import main

if __name__ == "__main__":
    main()
