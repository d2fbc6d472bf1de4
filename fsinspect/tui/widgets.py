"""The widgets: a Line-API exchanges list (millions of rows), the detail pane, the filter bar and the panels.

The list is a ScrollView that renders only the visible lines (toolong's model): its cost does not depend on
how many exchanges there are.  A DataTable is used only for the small tables (stats, SYNCFS).
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.suggester import Suggester
from textual.widget import Widget
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from ..analysis import Exchange, FilterError, compile_filter
from ..analysis import exchange as X
from ..analysis.filter import completions as filter_completions
from ..analysis.filter import filter_costs
from ..recording.indexed import ERROR, LINT, IndexedRecording
from ..recording.reader import RecordingError
from .panels import ApplyFilter
from .render import (
    TIME_MODES,
    FieldLine,
    field_lines,
    header_text,
    hexdump,
    layout_text,
    number,
    row_key,
    row_text,
)
from .sources import Source, Store

FOLLOW_DETAIL_EVERY = 1.0  # seconds between detail-pane updates while following the tail
FILTER_CHUNK = 20_000  # exchanges a tick tests against the filter (keeps a tick well under 100 ms)
SORT_MAX = 1_000_000  # rows a replay's latency sort takes (its working set: ~40 MB at this size)


class ExchangeList(ScrollView, can_focus=True):
    """Every exchange (or those the filter keeps), one line each, rendered on demand."""

    DEFAULT_CSS = """
    ExchangeList { height: 1fr; overflow-x: hidden; }
    """
    BINDINGS = [
        Binding("up,k", "move(-1)", "Up", show=False),
        Binding("down,j", "move(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "PgUp", show=False),
        Binding("pagedown", "page(1)", "PgDn", show=False),
        Binding("home,g", "top", "Top", show=False),
        Binding("end,G", "bottom", "Tail", show=False),
        Binding("f", "toggle_follow", "Follow"),
        Binding("p", "toggle_pause", "Pause"),
        Binding("m", "mark", "Mark"),
        Binding("n", "next_mark(1)", "Next mark"),
        Binding("N", "next_mark(-1)", "Prev mark", show=False),
        Binding("e", "next_error(1)", "Next error"),
        Binding("l", "next_lint(1)", "Next lint", show=False),
        Binding("t", "time_mode", "Time", show=False),
        Binding("s", "sort", "Sort", show=False),
    ]

    cursor: reactive[int] = reactive(0, repaint=False, init=False)

    class Selected(Message):
        """The cursor moved onto another exchange."""

        def __init__(self, index: int | None) -> None:
            super().__init__()
            self.index = index

    def __init__(self, store: Store, **kw: Any) -> None:
        super().__init__(**kw)
        self.store = store
        self.view: Sequence[int] | None = None  # exchange indexes the filter kept; None = all
        self.order: array[int] | None = None  # rows sorted by latency (a snapshot of the view), or None
        self.count = 0  # rows shown (frozen while paused)
        self.follow = True
        self.paused = False
        self.marks: set[int] = set()
        self.t0 = 0  # the first record's time: what relative times count from (as tshark)
        self.time_mode = TIME_MODES[0]
        self.base = store.base  # the store's window start when rows were last counted
        self._sent: tuple[int | None, bool] | None = None  # (exchange, replied) the detail pane was told of
        self._seen: int | None = None  # the selection at the previous tick
        self._strips: dict[tuple[Any, ...], Strip] = {}  # rendered rows; a row changes when its reply comes
        self._painted: tuple[int, int, int, int] | None = None
        self._sent_at = 0.0
        self._want: int | None = None  # the exchange to select once a growing filter view has it

    # -- rows ------------------------------------------------------------------------------------
    @property
    def rows_shown(self) -> int:
        """Rows on screen: the region inside the scrollbars (`size` counts the rows a scrollbar covers)."""
        return self.scrollable_content_region.height

    def index_at(self, row: int) -> int | None:
        if not 0 <= row < self.count:
            return None
        if self.order is not None:
            return self.order[row]
        if self.view is not None:
            return self.view[row] if row < len(self.view) else None
        return self.base + row

    @property
    def selected(self) -> int | None:
        return self.index_at(self.cursor)

    def row_of(self, index: int) -> int | None:
        if self.order is not None:
            try:
                return self.order.index(index)  # a C scan of a flat array: jumps are rare
            except ValueError:
                return None
        if self.view is None:
            row = index - self.base
            return row if 0 <= row < self.count else None
        r = bisect.bisect_left(self.view, index)
        return r if r < len(self.view) and self.view[r] == index and r < self.count else None

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        row = self.scroll_offset.y + y
        i = self.index_at(row)
        if i is None:
            return Strip.blank(width, self.rich_style)
        ex = self.store.get(i)
        if ex is None:  # forgotten by a trim this very moment: the next tick redraws
            return Strip.blank(width, self.rich_style)
        if not self.t0:
            exs = self.store.exchanges
            self.t0 = self.store.first_ts or (exs[0].ts_ns if exs else ex.ts_ns)
        prev_ts: int | None = None
        if self.time_mode == "delta":  # tshark's "delta displayed": since the row above
            p = self.index_at(row - 1) if row else None
            prev = self.store.get(p) if p is not None else None
            prev_ts = prev.ts_ns if prev is not None else None
        sel = 2 if row == self.cursor and self.has_focus else (1 if row == self.cursor else 0)
        now, mono = self.store.now()
        path = self.store.path(i)
        key = (i, width, sel, i in self.marks, self.time_mode, prev_ts, path, ex.submount, *row_key(ex, now, mono))
        strip = self._strips.get(key)
        if strip is None:
            text = row_text(ex, path, width, self.t0, i in self.marks, mode=self.time_mode,
                            prev_ts=prev_ts, now_ns=now, mono_ns=mono)
            if sel:
                text.stylize("reverse" if sel == 2 else "underline")
            strip = Strip([s for s in text.render(self.app.console) if s.text != "\n"], width).crop(0, width)
            if len(self._strips) > 4 * max(64, self.rows_shown):
                self._strips.clear()
            self._strips[key] = strip
        return strip

    def sync(self) -> None:
        """Called every tick: pick up new rows, keep following the tail, repaint replies that came in."""
        if self.paused or self.order is not None:  # a sorted view is a snapshot: `s` again catches up
            return
        st = self.store
        if st.base != self.base:  # the live window moved: keep the cursor on the same exchange if it is kept
            shift = st.base - self.base
            self.base = st.base
            if self.view is None:
                self.cursor = max(0, self.cursor - shift)
                self.scroll_to(y=max(0, self.scroll_offset.y - shift), animate=False, immediate=True)
            self.marks = {m for m in self.marks if m >= self.base}
        n = len(self.view) if self.view is not None else len(st.exchanges)
        if n != self.count:
            self.count = n
            self._set_rows(n)
        if self._want is not None and self.view is not None and n:
            self._catch_up(n)
        if self.follow and n:
            self.cursor = n - 1
            if self.scroll_offset.y + self.rows_shown < n:
                self.scroll_to(y=max(0, n - self.rows_shown), animate=False, immediate=True)
        # Repaint only if the visible rows could have changed: new rows in view, or replies still to come.
        top = self.scroll_offset.y
        bottom = min(n, top + self.rows_shown)
        sig = (top, bottom, self.cursor, st.rec.analysed if st.rec is not None else 0)  # paths, lints come
        waiting = any(ex is not None and ex.state != X.DONE
                      for ex in (st.get(i) for i in (self.index_at(r) for r in range(top, bottom))
                                 if i is not None))
        if sig != self._painted or waiting:
            self._painted = sig
            self.refresh()
        self._announce(now=not self.follow)

    def _set_rows(self, n: int) -> None:
        """Grow the virtual height without a screen-wide layout pass (the `virtual_size` reactive does one
        on every change): only the scroll limits and the scrollbar depend on it, unless the scrollbar appears."""
        size = Size(0, n)  # no horizontal extent: rows are cut to the width, never scrolled sideways
        h = self.rows_shown
        if (self.virtual_size.height > h) != (n > h) or self.virtual_size.width != size.width:
            self.virtual_size = size
            return
        self.set_reactive(ScrollView.virtual_size, size)
        if self.show_vertical_scrollbar:
            self.vertical_scrollbar.window_virtual_size = n

    def _announce(self, *, now: bool = True) -> None:
        """Tell the detail pane which exchange is selected (again when its reply has come in).

        Following a fast feed it changes once a second, not every tick; as soon as the feed rests for one
        tick it shows the newest exchange.
        """
        sel = self.selected
        ex = self.store.get(sel) if sel is not None else None
        key = (sel, ex is not None and ex.replied)
        resting = sel == self._seen
        self._seen = sel
        if key != self._sent:
            if not now and not resting and time.monotonic() - self._sent_at < FOLLOW_DETAIL_EVERY:
                return
            self._sent = key
            self._sent_at = time.monotonic()
            self.post_message(self.Selected(sel))

    def reset_view(self, view: Sequence[int] | None) -> None:
        keep = self.selected
        self.order = None
        self.view = view
        self.base = self.store.base
        self.count = len(view) if view is not None else len(self.store.exchanges)
        self.virtual_size = Size(0, self.count)
        row = self.row_of(keep) if keep is not None else None
        self.cursor = row if row is not None else max(0, self.count - 1 if self.follow else 0)
        # A replay's filter fills its view in a thread: the selected exchange may match further on.
        self._want = keep if row is None and view is not None else None
        self._scroll_cursor()
        self._painted = None
        self.refresh()
        self._announce()

    def watch_cursor(self, old: int, new: int) -> None:
        top = self.scroll_offset.y
        for r in (old, new):
            if top <= r < top + self.rows_shown:
                self.refresh_line(r - top)

    def _scroll_cursor(self) -> None:
        h = max(1, self.rows_shown)
        top = self.scroll_offset.y
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + h:
            self.scroll_to(y=self.cursor - h + 1, animate=False, immediate=True)

    def _catch_up(self, n: int) -> None:
        """Put the cursor back on the exchange that was selected when the filter was applied, once the
        growing view reaches it (Wireshark keeps the selected packet across a new display filter)."""
        assert self.view is not None and self._want is not None
        row = self.row_of(self._want)
        if row is not None:
            self._want = None
            self.go(row, follow=False)
        elif self.view[n - 1] > self._want:  # the view went past it: the filter hides it
            self._want = None

    def go(self, row: int, *, follow: bool | None = None) -> None:
        self._want = None  # a move of the user's own wins over a selection still to come
        if not self.count:
            return
        self.cursor = max(0, min(self.count - 1, row))
        self.follow = follow if follow is not None else (self.follow and self.cursor == self.count - 1)
        self._scroll_cursor()
        self._announce()

    def jump_to_exchange(self, index: int) -> bool:
        """Put the cursor on exchange `index`; False if the current filter hides it."""
        row = self.row_of(index)
        if row is None:
            return False
        self.go(row, follow=False)
        return True

    # -- actions ---------------------------------------------------------------------------------
    def action_move(self, delta: int) -> None:
        self.go(self.cursor + delta, follow=False if delta < 0 else None)

    def action_page(self, delta: int) -> None:
        self.go(self.cursor + delta * max(1, self.rows_shown - 1), follow=False if delta < 0 else None)

    def action_top(self) -> None:
        self.go(0, follow=False)

    def action_bottom(self) -> None:
        self.paused = False
        self.sync()
        self.go(self.count - 1, follow=True)

    def action_toggle_follow(self) -> None:
        self.follow = not self.follow
        if self.follow:
            self.action_bottom()
        self.app.refresh_bindings()

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused:
            self.sync()
        self._announce()  # the detail pane shows the row under the cursor now, paused or caught up

    def sort_by_latency(self) -> bool:
        """Rows from the slowest to the fastest (unanswered last): a snapshot of what the list shows now.
        A replay reads latencies from its rows (no decoding); it sorts at most SORT_MAX rows (the sort
        itself holds a Python int per row while it runs): False, with a word to the user, beyond."""
        rows = self.view if self.view is not None else range(self.store.base, self.store.end)
        if self.store.rec is not None and len(rows) > SORT_MAX:
            self.app.bell()
            self.app.notify(f"{len(rows):,} rows: the latency sort takes at most {SORT_MAX:,} (filter first)",
                            severity="warning")
            return False
        lat_of = self.store.latency_of

        def slow(i: int) -> int:
            lat = lat_of(i)
            return -lat if lat is not None else 1

        self.order = array("Q", sorted(rows, key=slow))
        self.count = len(self.order)
        self.follow = False
        self.virtual_size = Size(0, self.count)
        self.cursor = 0
        self.scroll_to(y=0, animate=False, immediate=True)
        self._painted = None
        self.refresh()
        self._announce()
        return True

    def action_sort(self) -> None:
        """`s`: sort by latency (slowest first); `s` again: capture order, on the same exchange."""
        if self.order is None:
            self.sort_by_latency()
        else:
            self.reset_view(self.view)

    def action_time_mode(self) -> None:
        """Cycle the time column: relative to the first record (tshark's default), absolute, delta."""
        self.time_mode = TIME_MODES[(TIME_MODES.index(self.time_mode) + 1) % len(TIME_MODES)]
        self.refresh()
        self.app.notify(f"time column: {self.time_mode}", timeout=2)

    def action_mark(self) -> None:
        i = self.selected
        if i is not None:
            self.marks.symmetric_difference_update({i})
            self.refresh_line(self.cursor - self.scroll_offset.y)

    def _seek(self, delta: int, pred: Callable[[int], bool], what: str = "match", bit: int = 0) -> bool:
        row = self.cursor + delta
        st = self.store
        if bit and st.rec is not None and self.view is None and self.order is None:
            # A replay's whole list: its rows' flags on disk, searched in C (any distance, no decoding).
            found = st.rec.find(bit, st.base + row, delta)
            if found is not None:
                self.go(found - st.base, follow=False)
                return True
            if st.rec.analysed < len(st.rec):
                self.app.notify(f"no {what} {'below' if delta > 0 else 'above'} this row in the "
                                f"{st.rec.analysed:,} exchanges analysed so far", timeout=3)
                return False
            row = -1  # nothing: say so below
        steps = 0
        while 0 <= row < self.count and steps < 2_000_000:
            i = self.index_at(row)
            if i is not None and pred(i):
                self.go(row, follow=False)
                return True
            row += delta
            steps += 1
        self._seek_none(what, delta)
        return False

    def action_next_mark(self, delta: int) -> None:
        if not self.marks:
            self.app.bell()
            self.app.notify("no marks yet: m marks the selected exchange", timeout=3)
            return
        rows = [r for r in (self.row_of(m) for m in self.marks) if r is not None]
        ahead = [r for r in rows if (r - self.cursor) * delta > 0]  # the marks' own rows: no walk
        if ahead:
            self.go(min(ahead) if delta > 0 else max(ahead), follow=False)
            return
        self._seek_none("mark", delta)

    def _seek_none(self, what: str, delta: int) -> None:
        self.app.bell()
        where = "below" if delta > 0 else "above"
        self.app.notify(f"no {what} {where} this row: the {'end' if delta > 0 else 'top'} of the list", timeout=3)

    def _flagged(self, bit: int, attr: str) -> Callable[[int], bool]:
        """Whether exchange i has an error (or lints): from a replay's rows if they know, else decoded."""
        st = self.store

        def pred(i: int) -> bool:
            f = st.flags_of(i)
            if f is not None:
                return bool(f & bit)
            ex = st.get(i)
            return bool(ex is not None and getattr(ex, attr))

        return pred

    def action_next_error(self, delta: int) -> None:
        self._seek(delta, self._flagged(ERROR, "error"), "error", ERROR)

    def action_next_lint(self, delta: int) -> None:
        self._seek(delta, self._flagged(LINT, "lints"), "lint", LINT)

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    def on_click(self, event: events.Click) -> None:
        self.go(self.scroll_offset.y + event.y, follow=False)

    def on_resize(self, event: events.Resize) -> None:
        self.virtual_size = Size(0, self.count)
        self.call_after_refresh(self._scroll_cursor)  # the cursor row stays on screen in the new height


class ListHeader(Static):
    """The column titles above the list, as wide as its rows (the list's scrollbar takes the rest)."""

    DEFAULT_CSS = "ListHeader { height: 1; }"

    def __init__(self, xlist: ExchangeList, **kw: Any) -> None:
        super().__init__(**kw)
        self.xlist = xlist

    def width(self) -> int:
        return self.xlist.scrollable_content_region.width or self.size.width or 120

    def sync(self) -> None:
        """Called every tick: redraw if the list's scrollbar came or went, or the time mode changed."""
        if (self.width(), self.xlist.time_mode) != self._drawn:
            self.refresh()

    _drawn: tuple[int, str] = (0, "")

    def render(self) -> Text:
        self._drawn = (self.width(), self.xlist.time_mode)
        return header_text(*self._drawn)


class FieldList(OptionList):
    """The decoded tree of one side; the highlighted field's bytes light up in the hex dump.

    Enter or `a` filters on the highlighted field (Wireshark's Apply as Filter), `A` adds it with `and`.
    """

    BINDINGS = [Binding("a", "apply_field(False)", "Apply as filter"),
                Binding("A", "apply_field(True)", "…and selected", show=False)]

    def action_apply_field(self, narrow: bool) -> None:
        pane = self.parent.parent if self.parent is not None else None
        ln = pane.highlighted_field if isinstance(pane, DetailPane) else None
        if ln is None or ln.filter is None:
            self.app.bell()
            self.app.notify("no filter for this line (a value the filter language cannot name)", timeout=3)
            return
        self.app.post_message(ApplyFilter(ln.filter, narrow=narrow))


class DetailPane(Widget):
    """Decoded request and reply trees, the hex dump of the side in view, and the descriptor chain."""

    DEFAULT_CSS = """
    DetailPane { height: 45%; border-top: solid $accent; }
    DetailPane > Horizontal { height: 1fr; }
    DetailPane FieldList { width: 1fr; min-width: 30; border: none; }
    DetailPane #hexbox { width: 60%; max-width: 78; }
    DetailPane #title { height: 1; background: $boost; }
    """
    side: reactive[str] = reactive("request", init=False)

    def __init__(self, store: Store, source: Source, **kw: Any) -> None:
        super().__init__(**kw)
        self.store = store
        self.source = source
        self.index: int | None = None
        self.lines: list[FieldLine] = []
        self.raw: bytes = b""
        self.orig_len: int | None = None
        self.chain: list[tuple[int, int]] | None = None
        self.hex_text = Text()
        self._hl: tuple[int, int] | None = None
        self._deferred = False

    def compose(self) -> Any:
        yield Static("", id="title")
        with Horizontal():
            yield FieldList(id="fields")
            with VerticalScroll(id="hexbox"):
                yield Static("", id="hex")
                yield Static("", id="layout")

    def show(self, index: int | None) -> None:
        self.index = index
        self._load()

    def action_other_side(self) -> None:
        self.side = "reply" if self.side == "request" else "request"

    def watch_side(self, side: str) -> None:
        self._load()

    def _load(self) -> None:
        found = self.query("#title")
        if not found:  # torn down (a debounced show can fire while the app closes): nothing to draw into
            return
        title = found.first(Static)
        fields = self.query_one(FieldList)
        if fields.scrollable_content_region.width <= 0:
            # Not laid out (or hidden): Textual would wrap the options to width 0 and crash in rich's
            # chop_cells.  Load once the pane has a size.
            self._deferred = True
            return
        self._deferred = False
        fields.clear_options()
        ex_or_none = self.store.get(self.index) if self.index is not None else None
        if ex_or_none is None:
            title.update("no exchange selected" if self.index is None
                         else f"exchange #{self.index + 1} is no longer kept (a live session keeps the newest)")
            self.query_one("#hex", Static).update("")
            self.query_one("#layout", Static).update("")
            return
        ex = ex_or_none
        msg = ex.request if self.side == "request" else ex.reply
        req_rec, rep_rec = self.source.raw(ex)
        rec = req_rec if self.side == "request" else rep_rec
        raw = ex.req_raw if self.side == "request" else ex.reply_raw
        self.raw = rec.data if rec is not None else (raw or b"")
        self.orig_len = rec.orig_len if rec is not None else None
        self.chain = rec.layout if rec is not None else None
        other = "reply" if self.side == "request" else "request"
        title.update(f" #{number(ex)} {ex.opname} unique={ex.unique} — {self.side} (r: show {other})"
                     + (f"  lints: {', '.join(ex.lints)}" if ex.lints else "")
                     + (f"  notes: {'; '.join(ex.notes)}" if ex.notes else ""))
        self.lines = field_lines(msg) if msg is not None else [FieldLine(
            f"no {self.side}" + (f" ({ex.decode_error})" if ex.decode_error else ""))]
        fields.add_options([Option(Text("  " * ln.depth + ln.text, no_wrap=True)) for ln in self.lines])
        self._hex(None)
        self.query_one("#layout", Static).update(layout_text(self.chain))

    def on_resize(self, _event: Any) -> None:
        if self._deferred:
            self.call_after_refresh(self._load)
        elif self.raw:
            self._hex(self._hl)  # 16 or 8 bytes a line, whichever fits now

    def _hex(self, hl: tuple[int, int] | None) -> None:
        box = self.query_one("#hexbox").content_region.width
        per_line = 16 if box >= 74 or not box else 8  # 8 a line fits a narrow terminal
        self._hl = hl
        self.hex_text = (hexdump(self.raw, hl, orig_len=self.orig_len, per_line=per_line) if self.raw
                         else Text("(no bytes)"))
        self.query_one("#hex", Static).update(self.hex_text)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.query_one(FieldList).action_apply_field(False)

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        i = event.option_index
        if 0 <= i < len(self.lines):
            ln = self.lines[i]
            self._hex((ln.offset, ln.offset + ln.size) if ln.offset is not None and ln.size else None)

    @property
    def highlighted_field(self) -> FieldLine | None:
        i = self.query_one(FieldList).highlighted
        return self.lines[i] if i is not None and 0 <= i < len(self.lines) else None


def completions(value: str) -> list[str]:
    """What may replace the word being typed at the end of a filter (the parser decides)."""
    return filter_completions(value)[1]


class FilterSuggester(Suggester):
    """Completes the last word (accepted with → or Tab at the end of the line)."""

    def __init__(self) -> None:
        super().__init__(use_cache=False, case_sensitive=True)

    async def get_suggestion(self, value: str) -> str | None:
        start, opts = filter_completions(value)
        return value[:start] + opts[0] if opts else None


HISTORY_KEEP = 200


class FilterBar(Widget):
    """The filter language: validated as you type, with a caret under the error; ↑ ↓ walk the filters
    applied before (newest first), as in a shell."""

    DEFAULT_CSS = """
    FilterBar { height: auto; display: none; }
    FilterBar.open { display: block; }
    FilterBar Input { border: tall $accent; }
    FilterBar Input.-invalid { border: tall $error; }
    FilterBar #ferr { height: auto; color: $text-muted; padding: 0 1; }
    FilterBar #ferr.bad { color: $error; }
    """

    class Apply(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.history: list[str] = []  # applied filters, oldest first, each once
        self._pos: int | None = None  # where ↑ ↓ are in the history (None: the line being typed)
        self._typed = ""

    def remember(self, text: str) -> None:
        text = text.strip()
        if text:
            if text in self.history:
                self.history.remove(text)
            self.history.append(text)
            del self.history[:-HISTORY_KEEP]
        self._pos = None

    def _walk(self, delta: int) -> None:
        if not self.history:
            self.app.bell()
            return
        if self._pos is None:
            if delta > 0:
                return
            self._typed = self.input.value
            pos = len(self.history) - 1
        else:
            pos = self._pos + delta
        if pos < 0:
            self.app.bell()
            return
        self._pos = None if pos >= len(self.history) else pos
        self.input.value = self._typed if self._pos is None else self.history[pos]
        self.input.cursor_position = len(self.input.value)

    def compose(self) -> Any:
        box = Input(placeholder="filter: op == LOOKUP and error == ENOENT   latency > 1ms   submount   lint",
                    suggester=FilterSuggester(), id="finput")
        box.cursor_blink = False  # a steady cursor: screenshots and snapshots come out the same every time
        yield box
        yield Static("", id="ferr")

    @property
    def input(self) -> Input:
        return self.query_one(Input)

    def validate(self, text: str) -> FilterError | None:
        err = self.query_one("#ferr", Static)
        if not text.strip():
            self.input.remove_class("-invalid")
            err.remove_class("bad")
            err.update("empty: every exchange.  Enter applies, Esc closes, → or Tab completes")
            return None
        try:
            compile_filter(text, path_of=str)  # any path: only the syntax is checked here
        except FilterError as e:
            self.input.add_class("-invalid")
            err.add_class("bad")
            # Under the offending column: the input's text starts where its content region does.
            pad = self.input.content_region.x - err.content_region.x if err.content_region.width else 2
            err.update(Text(" " * max(0, pad + e.column - 1) + "^ " + e.message))
            return e
        self.input.remove_class("-invalid")
        err.remove_class("bad")
        opts = completions(text)
        err.update("ok — Enter applies" + (f"   completions: {' '.join(opts[:8])}" if opts else ""))
        return None

    def on_input_changed(self, event: Input.Changed) -> None:
        self.validate(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if self.validate(event.value) is None:
            self.post_message(self.Apply(event.value))

    def on_key(self, event: events.Key) -> None:
        if event.key in ("up", "down") and self.input.has_focus:
            self._walk(-1 if event.key == "up" else 1)
            event.prevent_default()
            event.stop()
            return
        if event.key == "tab" and self.input.has_focus:
            opts = completions(self.input.value)
            if opts:
                m = re.search(r"([A-Za-z_][A-Za-z0-9_.-]*)$", self.input.value)
                assert m is not None
                self.input.value = self.input.value[:m.start()] + opts[0]
                self.input.cursor_position = len(self.input.value)
                event.prevent_default()
                event.stop()


class FilterState:
    """The applied filter and how far through the exchanges it has got.

    Live, a chunk of the kept exchanges is tested each tick.  A replay's filter runs over the whole
    recording in its own thread (IndexedRecording.scan): matches are appended to `view` (a flat array of
    exchange numbers, 4 bytes a match) as they are found, `upto` is its progress; a new filter stops it."""

    def __init__(self, text: str, pred: Callable[[Exchange], bool]) -> None:
        self.text = text
        self.pred = pred
        self.view: list[int] | array[int] = []
        self.upto = 0
        self.thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: str | None = None

    def advance(self, store: Store, budget: int = FILTER_CHUNK) -> bool:
        """Test up to `budget` more exchanges; True if the view grew.  Waits for pending replies near the tail."""
        if store.rec is not None:  # a replay: its own thread does the pass
            if self.thread is None:
                self._start(store)
            return False
        exs = store.analyzer.exchanges
        base = store.base
        view = self.view
        assert isinstance(view, list)
        if view and view[0] < base:  # forgotten by a live trim
            del view[:bisect.bisect_left(view, base)]
        n = len(exs)
        p = max(0, self.upto - base)  # positions in the kept window; indexes are base + position
        end = min(n, p + budget)
        grew = False
        pred = self.pred
        while p < end:
            ex = exs[p]
            if not ex.replied and ex.expects_reply and not store.done and n - p < 5000:
                break
            if pred(ex):
                view.append(ex.index)
                grew = True
            p += 1
        self.upto = base + p
        return grew

    def _start(self, store: Store) -> None:
        rec = store.rec
        assert rec is not None
        self.view = array("I" if len(rec) < 1 << 32 else "Q")
        self.thread = threading.Thread(target=self._scan, args=(rec,), name="fsinspect-filter", daemon=True)
        self.thread.start()

    def _scan(self, rec: IndexedRecording) -> None:
        def progress(done: int, total: int) -> None:
            self.upto = done

        view = self.view
        try:
            for i in rec.scan(self.pred, progress=progress, stop=self._stop, costs=filter_costs(self.text)):
                view.append(i)
        except (RecordingError, OSError, ValueError) as e:  # the file changed under us
            self.error = str(e)
            self.upto = len(rec)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def cancel(self) -> None:
        """Stop a replay's pass (a new filter replaces this one, or the UI closes)."""
        self._stop.set()

    def finish(self, store: Store) -> None:
        """Test every exchange now (up to replies still to come at a live tail): before a sort or export."""
        if store.rec is not None:
            if self.thread is None:
                self._start(store)
            assert self.thread is not None
            self.thread.join()
            return
        while self.upto < store.end:
            before = self.upto
            self.advance(store, budget=1 << 30)
            if self.upto == before:
                break
