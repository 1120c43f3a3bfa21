"""Following jobs: the one stream reader, following a job or a batch, the tally that keeps a stream
exact, waiting for a whole answer, and the cancels of clients that left."""
