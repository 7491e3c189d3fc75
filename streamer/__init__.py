"""telemetry-streamer: replay CSV rows as timestamped JSON messages into a topic."""
