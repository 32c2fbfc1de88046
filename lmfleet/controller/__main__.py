"""`python -m lmfleet.controller`: same flags as `lmfleet controller`."""

from lmfleet.cli import module_main

if __name__ == "__main__":
    module_main("controller")
