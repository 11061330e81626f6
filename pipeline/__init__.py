"""The machinery under cifar.py: data sources and their cache, partitions, fast batches, graph capture, cores."""
