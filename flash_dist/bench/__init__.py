"""Benchmarks: attention kernels, model swaps, training throughput."""
