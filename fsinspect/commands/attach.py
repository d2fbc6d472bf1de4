"""`fsinspect attach CTRL_SOCK`: the Textual UI live on a proxy's (or daemon's) control socket, or with
`--format` a headless stream of its exchanges (text, JSON lines, pcapng), like mitmdump and `tshark -i`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import privfile
from ..errors import UserError


def register(sub: Any) -> None:
    p = sub.add_parser("attach", help="watch a running proxy or daemon live: the UI, or a headless stream",
                       description="Attach to the control socket of `fsinspect proxy --control SOCK` (or "
                                   "`fsinspect daemon --control SOCK`).  Without --format: the Textual UI.  "
                                   "With --format: every finished exchange (that passes --filter) to stdout or "
                                   "-o FILE until Ctrl-C or the source ends; `--format pcapng | tshark -r - "
                                   "-X lua_script:recordings/fuse.lua` decodes it live.  Any number of clients "
                                   "may attach; a slow one never slows the source (it is told how many "
                                   "messages it missed).")
    p.add_argument("ctrl", metavar="CTRL_SOCK", help="the proxy's or daemon's --control socket")
    p.add_argument("--title", default=None, help="title shown in the UI's header")
    p.add_argument("--format", choices=("text", "jsonl", "pcapng"), default=None,
                   help="stream headless instead of the UI: one line per exchange, JSON lines, or pcapng "
                        "(a recording's blocks)")
    p.add_argument("--filter", metavar="EXPR", default=None,
                   help="with --format: only exchanges that match, e.g. 'op == SYNCFS', 'error != 0'")
    p.add_argument("-o", "--output", metavar="FILE", default=None,
                   help="with --format: write to FILE (created 0600, see --record-mode) instead of stdout")
    privfile.add_mode_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format is None:
        if args.filter is not None or args.output is not None:
            raise UserError("--filter and -o go with --format text|jsonl|pcapng (the UI has its own filter: /)")
        from ..tui.app import run_attach  # textual loads only for the UI commands

        try:
            return run_attach(args.ctrl, title=args.title)
        except ConnectionError as e:
            raise UserError(str(e)) from None
    return run_headless(args.ctrl, args.format, args.filter, args.output, args.record_mode)


def run_headless(ctrl: str, fmt: str, expr: str | None, dest: str | None, mode: int = privfile.DEFAULT_MODE,
                 *, stream: int | None = None, who: str = "fsinspect attach", quiet: bool = False) -> int:
    """Stream until the source closes or Ctrl-C (or SIGTERM: extcap's stop); shared with `fsinspect extcap`
    (`quiet`: Wireshark takes anything an extcap prints on stderr for an error)."""
    import signal
    import threading

    from ..live.headless import HeadlessFeed, open_sink

    feed = HeadlessFeed(ctrl)
    if expr is not None:  # (the filter language, and lark, load only for a filter)
        from ..analysis import FilterError, compile_filter

        try:
            feed.predicate = compile_filter(expr, path_of=feed.path_of)
        except FilterError as e:
            raise UserError(f"--filter: {e}") from None
    try:
        feed.connect()
    except ConnectionError as e:
        raise UserError(str(e)) from None
    try:
        feed.sink = open_sink(fmt, dest, feed.state, mode=mode, stream=stream)
    except OSError as e:
        feed.shutdown()
        raise UserError(f"{dest or 'stdout'}: {e.strerror or e}") from None
    main = threading.current_thread() is threading.main_thread()
    if main:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C: flush, then exit 0
    stopped = False
    try:
        feed.pump(threading.Event())
    except KeyboardInterrupt:
        stopped = True
    except BrokenPipeError:  # `| head`: the reader went away
        stopped = True
    finally:
        if main:
            # Stopping is under way: a repeated SIGTERM (Wireshark stops its extcap so once the FIFO closes,
            # maybe while the interpreter shuts down) must neither cut the flush short nor print a traceback,
            # which Wireshark shows as an error. A second Ctrl-C still ends it, quietly, should a write hang.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            feed.write_open()  # what still waits at the end (a hung back-end's requests), as pending
            feed.sink.close()
        except BrokenPipeError:
            pass
    if feed.refused:
        raise UserError(f"{ctrl}: the source closed the connection: {feed.refused}")
    if feed.broken:
        raise UserError(f"{feed.broken}; gave up the connection")
    if quiet:
        return 0
    end = "stopped" if stopped else "the source closed the control socket"
    sys.stderr.write(f"{who}: {end}; {feed.written} of {feed.seen} exchanges written"
                     + (f" ({feed.pending_at_end} still waiting, written as pending)" if feed.pending_at_end else "")
                     + (f", {feed.state.overflow} messages dropped by the source" if feed.state.overflow else "")
                     + "\n")
    return 0

