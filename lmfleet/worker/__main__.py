"""`python -m lmfleet.worker`: same flags as `lmfleet worker`."""

from lmfleet.cli import module_main

if __name__ == "__main__":
    module_main("worker")
