"""Unix-socket I/O shared by the proxy and the daemon: vhost-user framing with SCM_RIGHTS fds, listening sockets.

Why a package of its own, at the top: both `fsinspect.proxy` (the MITM, and the control hub's socket) and
`daemon` (the vhost-user back-end) speak vhost-user on a Unix socket and bind user-given socket paths, and
neither may import the other (the daemon imports nothing from `fsinspect`: an import-linter contract).
`dissectors` cannot hold it: it is pure, no I/O (another contract).  So the socket edge sits below both and
imports only `dissectors.spec` (the message tables) and the standard library.

- `wire`: one vhost-user message (header, payload, fds) per call, with the fds checked on arrival.
- `unixsock`: claim/release a listening socket path (only a stale socket is ever replaced).
"""
