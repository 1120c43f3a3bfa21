"""Admitting work up front: who asks, what fits a model, the admission script, refusals remembered,
and the submission of admitted jobs."""
