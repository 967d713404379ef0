"""Small random SD-architecture models shared by the tests and the benchmarks (`tiny_model`)."""
