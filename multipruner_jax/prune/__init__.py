"""The MultiPruner search and the prune job: scoring, steps, surgery, refinement, the report."""
