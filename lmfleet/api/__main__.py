"""`python -m lmfleet.api`: same flags as `lmfleet api`."""

from lmfleet.cli import module_main

if __name__ == "__main__":
    module_main("api")
