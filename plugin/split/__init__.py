"""The split of one model between edge and cloud: plan, limits, edge partition, context manager, cloud partition."""
