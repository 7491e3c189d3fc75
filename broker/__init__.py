"""ZeroMQ message broker for telemetry-streamer: topics, acknowledgments, stats over HTTP."""
