"""The runtime (private): Futures, the driver's runtime, the worker pool, local schedulers."""
