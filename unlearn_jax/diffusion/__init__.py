"""Noise schedules, DDIM steps, guidance and the scan sampler."""
