"""The live layer: what reads a running proxy's or daemon's control socket, below every client of it.

`feed.ControlFeed` turns the control protocol (fsinspect/live/hub.py) into Exchanges in an Analyzer; the
Textual UI (fsinspect/tui/sources.py), the headless `fsinspect attach --format` (headless.py) and the
Wireshark extcap (fsinspect/commands/extcap.py) all read the socket through it.  `registry` is where running
sources announce their control sockets (the Hub registers itself) and where the extcap finds them.  Nothing here imports textual or the CLI:
the UI and the commands sit above this package, the analysis and the recording writer below it.
"""
