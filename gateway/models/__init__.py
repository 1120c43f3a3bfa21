"""Models: the catalog clients list, and models added, changed, pulled and loaded while the service runs."""
