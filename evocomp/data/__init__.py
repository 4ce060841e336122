"""Samples and datasets: readers, the prepared table, the built-in shapes-vqa and scenes-vqa benchmarks."""
