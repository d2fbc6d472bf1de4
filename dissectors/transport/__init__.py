"""Unix-socket I/O shared by the proxy and the daemon: vhost-user framing with SCM_RIGHTS fds, listening sockets.

Why here: both `fsinspect.proxy` (the MITM, and the control hub's socket) and `daemon` (the vhost-user
back-end) speak vhost-user on a Unix socket and bind user-given socket paths, and neither may import the
other (the daemon imports nothing from `fsinspect`: an import-linter contract). `dissectors` is the layer
below both (spec tables, codecs, the ring engine), so the socket edge lives in it, as its one socket module
family: it imports only `dissectors.spec` (the message tables) and the standard library, and nothing above
(the "dissectors are pure" contract). The design card's top-level folders stay as they are.

- `wire`: one vhost-user message (header, payload, fds) per call, with the fds checked on arrival.
- `unixsock`: claim/release a listening socket path (only a stale socket is ever replaced).
"""
