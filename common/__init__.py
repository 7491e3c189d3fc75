"""What both commands share and neither owns: option value types (`options`), logging set-up
(`logsetup`), how a command line ends on an expected failure (`commandline`), names
(`names`: the topic and group rule) and time formatting (`timefmt`).

Nothing here knows about the broker or the streamer; both import it."""
