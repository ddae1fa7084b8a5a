"""`python -m simu_core ...` entry point."""

from simu_core.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
