"""ZeroMQ message broker for telemetry-streamer: topics, acknowledgments, stats over HTTP.

Public modules (what the streamer and users may import; everything else is the broker's own):

    broker.client     Publisher, Subscriber, Consumer (+ Blocking*): the wire protocol's clients
    broker.protocol   the frames and their constants, written down once
    broker.curve      ClientKeys: a client's CURVE key pair and the broker's public key
    broker.server     Broker, BrokerStartError: to embed a broker (as the streamer does)
    broker.config     BrokerConfig (and PersistenceConfig, CurveConfig, HttpSecurity): its settings
    broker.options    the broker's click option sets, for a command that embeds it

What both commands share without either owning it (option types, logging, HTTP helpers, the web
console, names, time format) lives in `common/`.
"""
