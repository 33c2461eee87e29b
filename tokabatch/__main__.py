"""`python -m tokabatch` is the `tokabatch` command."""

from tokabatch.cli import main

if __name__ == "__main__":
    main()
