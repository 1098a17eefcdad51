"""robustdiff service: HTTP API, Redis Streams queue, worker processes, metrics and the CLI."""
