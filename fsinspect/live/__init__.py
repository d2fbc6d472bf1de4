"""The live layer: one pipeline every live source feeds, and the clients of its control socket.

Design notes (the layering; import-linter contracts in pyproject.toml enforce every arrow)

    commands, cli, tui, demo          the user's entry points: parse, assemble, show
        |
    fsinspect.proxy                   a source: the vhost-user MITM (its Session is the proxy's assembly)
        |                             (the daemon engine is the other source; commands/_daemon_vhost.py
        |                              assembles it through live.engine)
    fsinspect.live                    the bus and its addons: pipeline.py (Addon, Pipeline), addons.py
        |                             (Recorder, Analysis, Summary, Publisher, Debugger), hub.py (the
        |                             control socket), engine.py (the daemon engine as a source);
        |                             feed.py, headless.py, registry.py (the clients' side, below)
    fsinspect.analysis, .recording, .intercept      what the addons do, each knowing only its own job
        |
    daemon                            the engine and its transports (vhost-user, /dev/fuse)
        |
    dissectors.transport              vhost-user framing with SCM_RIGHTS fds, listening socket paths
    dissectors                        spec tables, codecs, ring engine (no I/O but the transport edge)

Why these arrows:
- A source knows only the bus.  The proxy and the daemon never import each other: the proxy's shadow
  path and the daemon's engine both turn into `Pipeline.request/reply/held` calls, so the recording, the
  analysis, the summary, the hub and the debugger are written once and behave the same on both (one
  snapshot and summary shape: analysis/render.py serialises them).
- `daemon` imports nothing from `fsinspect`: it is the standalone back-end, usable (and sandboxed) without
  the inspector.  The engine reaches the live layer through two plain callables it is given (its tap and
  its HoldPoint's on_held), adapted by `engine.EngineSource`.  What both the daemon and the proxy need
  from sockets (vhost-user messages with fds, listening socket paths) is `dissectors.transport`, below
  both (the design card keeps the top-level folders as named).
- The live layer imports no source, UI or CLI: a new source (or client) is added above it without
  touching it.  The consumers below it (analysis, recording, intercept) import no live layer, so each is
  usable on its own: `fsinspect replay`/`stats` analyse recordings with no bus at all.
- Only edge modules do I/O (hub.py, the recording writer, dissectors.transport, the daemon's transports);
  the analysis and the rest of the dissectors are pure.  Textual only under fsinspect/tui.

The data path never waits on an addon: the proxy's forwarding runs in the ring engine's threads (C or
its twin); addons run on the capture thread, which only reads the capture buffer, and the hub's publish_*
only append to a bounded outbox.  A hook an addon does not define costs nothing (Pipeline dispatches only
overridden hooks), and the proxy defers analysis while nobody watches (addons.Analysis).

The clients' side: `feed.ControlFeed` turns the control protocol (hub.py) into Exchanges in an Analyzer
through the feed loop replay shares (feed.Feed); the Textual UI (fsinspect/tui/sources.py), the headless
`fsinspect attach --format` (headless.py) and the Wireshark extcap (fsinspect/commands/extcap.py) all read
the socket through it.  `registry` is where running sources announce their control sockets (the Hub
registers itself) and where the extcap finds them.
"""
