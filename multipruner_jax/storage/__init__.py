"""Models and data on disk: HF directories, checkpoints, model inputs, text sources, job folders."""
