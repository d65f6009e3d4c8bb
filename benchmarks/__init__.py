"""Speed benchmarks against plain references (see README.md); not part of the test suite."""
