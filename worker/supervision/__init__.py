"""Keeping workers alive and jobs whole: the watchdog, its restart policy, orphaned jobs reclaimed, and
the crash suspect that finds a job killing its worker."""
