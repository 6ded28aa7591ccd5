"""Benchmarks of the serving stack; `make bench` runs them and writes docs/benchmarks.md."""
