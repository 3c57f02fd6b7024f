"""Sampling chains built from the model kinds and samplers: feature -> pixel decoders."""
