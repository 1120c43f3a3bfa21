"""`python -m worker.watchdog`, as scripts/run and the installed services start it: the watchdog of
worker/supervision/watchdog.py."""

from worker.supervision.watchdog import main

if __name__ == "__main__":
    main()
