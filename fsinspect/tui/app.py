"""The fsinspect Textual app: one UI over two sources, a recording (replay) or a proxy's control socket (attach).

Entry points for the commands and `fsinspect demo`: `run_replay(path)` and `run_attach(ctrl_path, title=...)`.
The source feeds a Store from its own thread; the app looks at it ten times a second (`tick`), so a fast
feed costs the UI one refresh per tick, never one per exchange.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Footer, Header, Static, TabbedContent, TabPane

from .. import privfile
from ..analysis import FilterError, compile_filter
from ..analysis.render import exchange_json
from ..recording.export import Exported
from ..recording.reader import RecordingError
from .debugger import (
    ErrnoSuggester,
    FieldsScreen,
    HeldPanel,
    PromptScreen,
    RulesPanel,
    delay_error,
    errno_completions,
    errno_error,
    errno_value,
    op_rule,
    strip_ms,
)
from .panels import ApplyFilter, ControlPanel, InodePanel, JumpTo, StatsPanel, SubmountPanel, TravelChanged
from .render import exchange_text, goto_target
from .sources import AttachSource, CommandError, ReplaySource, Source, Store
from .widgets import DetailPane, ExchangeList, FilterBar, FilterState, ListHeader

TICK = 0.1
DETAIL_DELAY = 0.06  # seconds the cursor must rest before the detail pane follows it

HELP = """\
[b]fsinspect[/b] — FUSE over virtio-fs, live (attach) or recorded (replay)

[b]Exchanges list[/b]
  ↑ ↓ j k PgUp PgDn Home  move (moving up stops following the tail)
  End / G  f            follow the tail (live: newest exchange) / toggle follow
  p                     pause the list (the feed keeps running; p again catches up)
  m  n  N               mark the exchange, next / previous mark
  e  l                  next error, next lint
  Ctrl-G                go to #N or a time (+1.5, 250ms after the first record; 14:03:07)
  t                     time column: relative to the first record (as tshark) → absolute → delta
  s                     sort by latency, slowest first (a snapshot; s again: capture order)
  r                     detail pane: show the request or the reply (jump between the two)
  Tab                   move focus: list → detail fields (highlight a field: its bytes light up)
  /                     filter bar (Enter applies, Esc closes, → or Tab completes); Esc clears
                        ↑ ↓ in the bar: the filters applied before
  Enter or a  (on a field)  apply as filter; A: and it with the filter in force
  y  Y                  copy the exchange as text / JSON to the clipboard (OSC 52)
  w                     write the exchange as JSON to ./fsinspect-exchange-N.json
  W                     export the exchanges shown (the filter's) as pcapng, to a path you pick
[b]Debugger (live only: attach to a proxy, or to a daemon with --control)[/b]
  b                     break on the current filter (no filter: asks, offering the opcode)
  c                     continue the held exchange (request → back-end, reply → guest)
  E                     answer with an errno (a held reply is rewritten); Tab completes
  d                     delay the held exchange by N ms, then continue it
  x                     edit the reply's decoded fields in a form; re-encoded, then sent
  C                     continue every held exchange
  u  U                  remove the rule highlighted in the Rules panel / every rule
  Held rows are highlighted and listed in the Held panel; pending rows show their age.
[b]Panels[/b]
  1 exchanges  2 inodes & lints  3 submounts & SYNCFS  4 stats  5 control plane
  (each panel takes the focus: arrows and Enter act at once)
  Enter on a lint, superblock or SYNCFS row jumps to its exchange
  Enter on an opcode (4): its exchanges, slowest first
  a on an inode (Enter too; space opens a branch), a superblock or a SYNCFS row: filter on it
  2 in a replay: the inode map as of the exchange selected in the list (time travel); T: now / as of
[b]Filter language[/b]
  op == LOOKUP and name ~ "foo"    error == ENOENT    latency > 1ms    nodeid == 4
  path ~ "sub"    decoded fields by path: read.size >= 4096    entry.attr.flags != 0
  submount    lint == "no-reply"   queue == 0    not (op == FORGET)    error != 0
  fields: {fields}
  flags: {flags}

  ? this help    q quit
"""


class HelpScreen(ModalScreen[None]):
    """Every key binding and the filter language, one screen."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 100; height: 90%; border: thick $accent; background: $surface;
                                  padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        from ..analysis.filter import FIELDS, FLAGS

        with VerticalScroll():
            yield Static(HELP.format(fields=", ".join(FIELDS), flags=", ".join(FLAGS)))

    def action_dismiss(self, result: Any = None) -> None:  # type: ignore[override]
        self.dismiss()


class StatusLine(Widget):
    """One line of source, progress, counts, filter, overflow and mode; repainted without a layout pass."""

    DEFAULT_CSS = "StatusLine { height: 1; background: $boost; }"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.text = Text()

    def set(self, text: Text) -> None:
        self.text = text
        self.refresh()

    def render(self) -> Text:
        return self.text


class FsInspectApp(App[int]):
    """The inspector: exchanges list + detail, filter bar, and the inode/submount/stats/control panels."""

    TITLE = "fsinspect"
    CSS = """
    #exchanges-pane { layout: vertical; height: 1fr; }
    TabbedContent { height: 1fr; }
    TabPane { padding: 0; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("r", "other_side", "Req/Reply"),
        Binding("y", "copy('text')", "Copy"),
        Binding("Y", "copy('json')", "Copy JSON", show=False),
        Binding("w", "write_json", "Write JSON", show=False),
        Binding("W", "export", "Export pcapng", show=False),
        Binding("b", "break_filter", "Break"),
        Binding("c", "verdict('release')", "Continue"),
        Binding("E", "verdict('errno')", "Errno", show=False),
        Binding("d", "verdict('delay')", "Delay", show=False),
        Binding("x", "verdict('fields')", "Edit", show=False),
        Binding("C", "continue_all", "Continue all", show=False),
        Binding("u", "remove_rule", "Remove rule", show=False),
        Binding("U", "remove_all_rules", "Remove all rules", show=False),
        Binding("1", "tab('exchanges')", "Exchanges", show=False),
        Binding("2", "tab('inodes')", "Inodes", show=False),
        Binding("3", "tab('submounts')", "Submounts", show=False),
        Binding("4", "tab('stats')", "Stats", show=False),
        Binding("5", "tab('control')", "Control", show=False),
        Binding("ctrl+g", "goto", "Go to", show=False),
    ]

    def __init__(self, source: Source, *, title: str | None = None, tick: float = TICK) -> None:
        super().__init__()
        self.source = source
        self.store = source.store
        self.sub_title = title or self.store.title
        self.tick_interval = tick
        self.filter: FilterState | None = None
        self.ticks = 0
        self.tick_seconds = 0.0  # time spent in ticks (the bench reads it)
        self.last_copy: str | None = None
        self.last_command: dict[str, Any] | None = None  # the debugger's last command and its reply (tests)
        self.last_reply: dict[str, Any] | None = None
        self._status_line = ""
        self._detail_want: int | None = None
        self._detail_timer: Timer | None = None
        # Widgets kept by reference: ticks must find them whatever screen (help) is on top.
        self.filterbar = FilterBar(id="filterbar")
        self.xlist = ExchangeList(self.store, id="list")
        self.listheader = ListHeader(self.xlist)
        self.detail = DetailPane(self.store, self.source, id="detail")
        self.panels: dict[str, Any] = {"inodes": InodePanel(self.store, id="inodepanel"),
                                       "submounts": SubmountPanel(self.store, id="submountpanel"),
                                       "stats": StatsPanel(self.store, id="statspanel"),
                                       "control": ControlPanel(self.store, id="controlpanel")}
        self.statusline = StatusLine(id="status")
        self.held = HeldPanel(self.store, id="held")
        self.rules = RulesPanel(id="rules")

    # -- layout ----------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        self.tabbed = TabbedContent(initial="exchanges")
        with self.tabbed:
            with TabPane("Exchanges", id="exchanges"), Vertical(id="exchanges-pane"):
                yield self.filterbar
                yield self.held
                yield self.rules
                yield self.listheader
                yield self.xlist
                yield self.detail
            with TabPane("Inodes & lints", id="inodes"):
                yield self.panels["inodes"]
            with TabPane("Submounts & SYNCFS", id="submounts"):
                yield self.panels["submounts"]
            with TabPane("Stats", id="stats"):
                yield self.panels["stats"]
            with TabPane("Control plane", id="control"):
                yield self.panels["control"]
        yield self.statusline
        yield Footer()

    def on_mount(self) -> None:
        # The source thread decodes flat out; a short switch interval hands the GIL back to the event loop
        # within 1 ms instead of 5 (each loop iteration would otherwise wait that long for it).
        sys.setswitchinterval(0.001)
        gc.freeze()  # the widgets just built live as long as the app: keep them out of full collections
        if not self.source.thread.is_alive() and not self.store.done:
            self.source.start()
        self.set_interval(self.tick_interval, self.tick)
        self.query_one(ExchangeList).focus()

    def on_unmount(self) -> None:
        self.source.stop()
        if self.filter is not None:
            self.filter.cancel()

    @property
    def active_tab(self) -> str:
        return self.tabbed.active

    def set_tab(self, name: str) -> None:
        self.tabbed.active = name

    # -- the tick --------------------------------------------------------------------------------
    def tick(self) -> None:
        if not self.xlist.is_mounted or self._exit:
            return
        t0 = time.perf_counter()
        self.ticks += 1
        lst = self.xlist
        if self.filter is not None:
            self.filter.advance(self.store)
            lst.view = self.filter.view
        lst.sync()
        self.listheader.sync()
        self.held.refresh_from_store()
        if self.ticks % 10 == 1:
            self.poll_rules()  # hits, and rules another client set
        active = self.active_tab
        if active != "exchanges" and self.ticks % 10 == 1:
            self._refresh_panel(active)
        self._status()
        self.tick_seconds += time.perf_counter() - t0

    def _refresh_panel(self, name: str) -> None:
        panel = self.panels.get(name)
        if panel is None:
            return
        if isinstance(panel, InodePanel):
            sel = self.xlist.selected
            travel = panel.travel and self.store.kind == "replay" and sel is not None and sel != self.store.end - 1
            panel.as_of = sel if travel else None
        panel.refresh_from_store()

    def on_travel_changed(self, event: TravelChanged) -> None:
        self._refresh_panel("inodes")

    def _status(self) -> None:
        st = self.store
        lst = self.xlist
        n = st.end
        parts = [st.title, st.status]
        if st.progress is not None:
            doing = "indexing" if st.rec is not None and not st.rec.index.complete else "analysing"
            parts.append(f"{doing} {st.progress * 100:.0f}%")
        parts.append(f"{n} exchanges")
        pending = len(st.open) if st.kind == "attach" else 0
        held = len(self.held.rows)
        if pending:
            parts.append(f"{pending} pending" + (f", {held} HELD" if held else ""))
        if st.base:
            parts.append(f"keeping the newest {len(st.exchanges)} (#{st.number_of(st.base)}…)")
        if self.filter is not None:
            f = self.filter
            done = "" if f.upto >= n else f" (filtering {f.upto * 100 // max(1, n)}%: {f.upto:,} of {n:,})"
            parts.append(f"filter [{f.text}]: {len(f.view)} shown{done}"
                         + (f" (stopped: {f.error})" if f.error else ""))
        if st.overflow:
            parts.append(f"OVERFLOW: {st.overflow} missed")
        if st.error:
            parts.append(f"ERROR: {st.error}")
        mode = ("SORTED by latency, slowest first (s: capture order)" if lst.order is not None
                else "PAUSED" if lst.paused else ("FOLLOW" if lst.follow else ""))
        if mode:
            parts.append(mode)
        if lst.marks:
            parts.append(f"{len(lst.marks)} marked")
        line = " | ".join(p for p in parts if p)
        if line == self._status_line:
            return
        self._status_line = line
        text = Text(line)
        if st.overflow or st.error:
            text.stylize("bold red")
        self.statusline.set(text)

    # -- events ----------------------------------------------------------------------------------
    def on_exchange_list_selected(self, event: ExchangeList.Selected) -> None:
        # Debounced: holding a key down moves the cursor many rows; the detail pane (a layout pass) follows
        # once the cursor rests for DETAIL_DELAY.
        self._detail_want = event.index
        if self._detail_timer is not None:
            self._detail_timer.stop()
        self._detail_timer = self.set_timer(DETAIL_DELAY, self._show_detail)

    def _show_detail(self) -> None:
        self._detail_timer = None
        if self._exit:  # the timer can fire during teardown, after the pane's children are gone
            return
        self.detail.show(self._detail_want)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        pane = event.pane.id or ""
        if pane == "inodes":
            self.panels["inodes"].rebuild()  # shown again: as of the exchange selected now
        self._refresh_panel(pane)
        self.focus_now(self.main_widget(pane))

    def main_widget(self, pane: str) -> Widget | None:
        """What takes the focus when a panel is shown (the hidden one had it)."""
        return self.xlist if pane == "exchanges" else getattr(self.panels.get(pane), "main", None)

    def focus_now(self, widget: Widget | None) -> None:
        """Focus `widget` before the next key is handled: `Widget.focus()` waits for the keys already
        queued, so a fast typist's `/op` or `2↓` would go to the widget that had the focus."""
        if widget is not None and self.focused is not widget:
            self.set_focus(widget)

    def on_filter_bar_apply(self, event: FilterBar.Apply) -> None:
        self.apply_filter(event.text)
        self.filterbar.remove_class("open")
        self.xlist.focus()

    def on_apply_filter(self, event: ApplyFilter) -> None:
        text = event.expr
        if event.narrow and self.filter is not None:
            text = f"({self.filter.text}) and {text}"
        try:
            self.apply_filter(text)
        except FilterError as e:
            self.notify(f"cannot filter on that: {e.message}", severity="warning")
            return
        self.filterbar.input.value = text
        self.set_tab("exchanges")
        self.xlist.focus()
        if event.slowest:
            self.slowest()
        self.notify(f"filter: {text}" + (", slowest first" if event.slowest else ""), timeout=3)

    def slowest(self) -> None:
        """Sort what the filter keeps by latency, slowest first (the filter finishes its pass first)."""
        f = self.filter
        if f is not None:
            if f.running:  # a replay's pass in its thread: sort once it is done, the UI meanwhile free
                self.notify("sorting once the filter has gone through the recording", timeout=2)
                self.set_timer(0.2, self.slowest)
                return
            f.finish(self.store)
            self.xlist.view = f.view
        self.xlist.sort_by_latency()

    def on_jump_to(self, event: JumpTo) -> None:
        self.jump(event.index)

    def on_option_list_option_selected(self, event: HeldPanel.OptionSelected) -> None:
        if event.option_list is self.held:
            ex = self.held.current
            if ex is not None:
                self.jump(ex.index)

    # -- API used by actions and tests -------------------------------------------------------------
    def apply_filter(self, text: str) -> None:
        """Filter the list (raises FilterError on a bad expression); an empty text shows everything."""
        if self.filter is not None:
            self.filter.cancel()  # a replay's pass still running stops at its next exchange
        if not text.strip():
            self.filter = None
            self.xlist.reset_view(None)
            return
        store = self.store
        pred = compile_filter(text, path_of=lambda e: store.path(e.index))
        self.filterbar.remember(text)
        self.filter = FilterState(text, pred)
        self.filter.advance(self.store)
        self.xlist.reset_view(self.filter.view)

    def jump(self, index: int) -> None:
        """Show exchange `index` in the list, dropping the filter if it hides it."""
        self.set_tab("exchanges")
        lst = self.xlist
        lst.sync()
        if not lst.jump_to_exchange(index):
            self.apply_filter("")
            lst.sync()
            if not lst.jump_to_exchange(index):
                self.notify(f"exchange #{self.store.number_of(index)} is no longer kept (a live session keeps the newest "
                            f"{len(self.store.exchanges)})", severity="warning")
        lst.focus()

    def goto(self, text: str) -> None:
        """Ctrl-G's answer: an exchange number (#N, as every `#N` on screen) or a time (see goto_target)."""
        kind, value = goto_target(text, self.xlist.t0 or self.store.first_ts)
        if kind == "n":
            index = self.store.find_number(value)
            if index is None:
                self.notify(f"no exchange #{value} (kept: #{self.store.number_of(self.store.base)}"
                            f"…#{self.store.number_of(self.store.end - 1)})", severity="warning")
                return
            self.jump(index)
            return
        index = self.store.find_time(value, self.filter.view if self.filter is not None else None)
        if index is None:
            self.notify("no exchange yet", severity="warning")
            return
        self.jump(index)

    def selected_exchange_text(self, kind: str) -> str | None:
        i = self.xlist.selected
        if i is None:
            return None
        ex = self.store.get(i)
        if ex is None:
            return None
        if kind == "json":
            return json.dumps(exchange_json(ex), default=str, indent=2) + "\n"
        return exchange_text(ex, self.store.path(i), self.xlist.t0)

    # -- actions ---------------------------------------------------------------------------------
    def action_other_side(self) -> None:
        """Show the reply of the exchange in view, or its request (wherever the focus is)."""
        self.detail.action_other_side()

    def action_goto(self) -> None:
        def check(text: str) -> str | None:
            try:
                goto_target(text, self.xlist.t0 or self.store.first_ts or 1)
            except ValueError as e:
                return str(e)
            return None

        def done(text: str | None) -> None:
            if text:
                self.goto(text)

        self.push_screen(PromptScreen("Go to exchange #N, or a time: +1.5 / 250ms after the first record, "
                                      "or 14:03:07.25", check=check, placeholder="#123  +1.5  14:03:07.25"),
                         done)

    # -- the debugger ----------------------------------------------------------------------------
    def current_exchange(self) -> Any:
        """What a debugger key acts on: the Held panel's row when it has the focus, else the list's."""
        if self.held.has_focus and self.held.current is not None:
            return self.held.current
        i = self.xlist.selected
        return self.store.get(i) if i is not None else None

    def send(self, cmd: str, what: str, **args: Any) -> bool:
        """A control-v2 command; its reply is shown as a notification.  False if it could not be sent."""
        def done(reply: dict[str, Any]) -> None:
            self.call_from_thread(self._command_done, what, reply, cmd)

        try:
            self.source.command(cmd, done, **args)
        except CommandError as e:
            self.notify(str(e), severity="error")
            return False
        self.last_command = {"cmd": cmd, **args}
        return True

    def _command_done(self, what: str, reply: dict[str, Any], cmd: str = "") -> None:
        self.last_reply = reply
        if cmd in ("add-rule", "remove-rule"):
            self.poll_rules()
        if reply.get("ok"):
            extra = f" (rule {reply['rule_id']})" if "rule_id" in reply else ""
            self.notify(f"{what}{extra}")
        else:
            self.notify(f"{what}: {reply.get('error', 'refused')}", severity="error")

    def action_break_filter(self) -> None:
        if self.filter is not None:
            self.send("add-rule", f"breakpoint on {self.filter.text}", rule=self.filter.text)
            return

        def check(text: str) -> str | None:
            try:
                compile_filter(text)
            except FilterError as e:
                return f"column {e.column}: {e.message}"
            return None

        def chosen(text: str | None) -> None:
            if text:
                self.send("add-rule", f"breakpoint on {text}", rule=text)

        self.push_screen(PromptScreen("break on (a filter expression; Enter sets the breakpoint)",
                                      value=op_rule(self.current_exchange()), check=check), chosen)

    def action_verdict(self, kind: str) -> None:
        ex = self.current_exchange()
        if ex is None or ex.held is None:
            self.bell()
            self.notify(("no exchange selected" if ex is None else f"#{ex.n} is not held")
                        + ": c, E, d and x act on held exchanges (b sets a breakpoint)", severity="warning")
            return
        n, on_reply = ex.n, ex.held == "reply"
        if kind == "release":
            self.send("release", f"#{n} continued", n=n)
        elif kind == "errno":
            def errno_chosen(text: str | None) -> None:
                if text:
                    self.send("rewrite" if on_reply else "answer", f"#{n} answered {text}", n=n,
                              errno=errno_value(text))

            self.push_screen(PromptScreen(f"#{n} {ex.opname}: {'rewrite the reply' if on_reply else 'answer'} "
                                          "with errno", check=errno_error, complete=errno_completions,
                                          suggester=ErrnoSuggester(), hint="Tab or → completes"), errno_chosen)
        elif kind == "delay":
            def delay_chosen(text: str | None) -> None:
                if text:
                    self.send("delay", f"#{n} delayed {strip_ms(text)} ms", n=n, ms=strip_ms(text))

            self.push_screen(PromptScreen(f"#{n} {ex.opname}: delay by (ms), then continue", value="200",
                                          check=delay_error), delay_chosen)
        else:
            def fields_chosen(fields: dict[str, Any] | None) -> None:
                if fields is not None:
                    self.send("rewrite" if on_reply else "answer", f"#{n} answered with edited fields", n=n,
                              fields=fields)

            try:
                screen = FieldsScreen(ex)
            except ValueError as e:
                self.notify(str(e), severity="error")
                return
            self.push_screen(screen, fields_chosen)

    def action_continue_all(self) -> None:
        self.send("continue-all", "every held exchange continued")

    def poll_rules(self) -> None:
        """Ask the handler for its rules; silent (a replay, or an old peer, simply shows none)."""
        def done(reply: dict[str, Any]) -> None:
            if reply.get("ok") and isinstance(reply.get("rules"), list):
                with contextlib.suppress(RuntimeError):  # the app ended meanwhile
                    self.call_from_thread(self.rules.set_rules, reply["rules"])

        with contextlib.suppress(CommandError):
            self.source.command("rules", done)

    def action_remove_rule(self) -> None:
        r = self.rules.current
        if r is None:
            self.bell()
            self.notify("no rule to remove (b sets a breakpoint)", severity="warning")
            return
        self.send("remove-rule", f"rule {r['rule_id']} removed: {r.get('rule', '')}", rule_id=r["rule_id"])

    def action_remove_all_rules(self) -> None:
        if not self.rules.rules:
            self.bell()
            self.notify("no rule to remove", severity="warning")
        for r in list(self.rules.rules):
            self.send("remove-rule", f"rule {r['rule_id']} removed", rule_id=r["rule_id"])

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_filter(self) -> None:
        self.set_tab("exchanges")
        bar = self.filterbar
        bar.add_class("open")
        if self.filter is not None and not bar.input.value:
            bar.input.value = self.filter.text
        self.focus_now(bar.input)

    def action_clear_filter(self) -> None:
        bar = self.filterbar
        if bar.has_class("open"):
            bar.remove_class("open")
            self.xlist.focus()
            return
        if self.filter is not None:
            bar.input.value = ""
            self.apply_filter("")

    def action_tab(self, name: str) -> None:
        self.set_tab(name)
        self.focus_now(self.main_widget(name))

    def action_copy(self, kind: str) -> None:
        text = self.selected_exchange_text(kind)
        if text is None:
            self.bell()
            return
        self.last_copy = text
        self.copy_to_clipboard(text)
        self.notify(f"copied exchange #{self.store.number_of(self.xlist.selected or 0)} as {kind} to the clipboard (OSC 52)")

    def shown_exchanges(self) -> list[int]:
        """The exchanges the list shows (what the filter keeps, all of it), in capture order."""
        if self.filter is None:
            return list(range(self.store.base, self.store.end))
        self.filter.finish(self.store)
        return list(self.filter.view)

    def export(self, dest: str) -> Exported:
        """Write the exchanges shown to `dest` as a pcapng recording (runs in a worker thread)."""
        shown = self.shown_exchanges()
        what = f"filter: {self.filter.text}" if self.filter is not None else "every exchange"
        note = f"exported by fsinspect from {self.store.title}: {len(shown)} exchanges ({what})"
        return self.source.export(dest, shown, note)

    def action_export(self) -> None:
        def check(text: str) -> str | None:
            path = Path(text.strip()).expanduser()
            if not text.strip():
                return "a file name, please"
            if not path.parent.is_dir():
                return f"no directory {path.parent}"
            if path.is_dir():
                return f"{path} is a directory"
            return None

        def done(text: str | None) -> None:
            if not text:
                return
            dest = str(Path(text.strip()).expanduser())
            self.notify(f"exporting to {dest}…", timeout=2)
            self.run_worker(lambda: self._export_worker(dest), thread=True, exclusive=True, group="export")

        what = f"the {len(self.filter.view)} exchanges the filter keeps" if self.filter is not None else \
            "every exchange"
        self.push_screen(PromptScreen(f"Export {what} as pcapng (with the control plane and INIT) to:",
                                      value=str(Path.cwd() / "fsinspect-export.pcapng"), check=check), done)

    def _export_worker(self, dest: str) -> None:
        try:
            res = self.export(dest)
        except (OSError, ValueError, RecordingError) as e:
            self.call_from_thread(self.notify, f"export failed: {e}", severity="error")
            return
        self.call_from_thread(self.notify, f"wrote {res.path}: {res.chosen} records chosen, "
                                           f"{res.records - res.chosen} of control plane and INIT")

    def action_write_json(self) -> None:
        text = self.selected_exchange_text("json")
        if text is None:
            self.bell()
            return
        path = Path.cwd() / f"fsinspect-exchange-{self.store.number_of(self.xlist.selected or 0)}.json"
        try:
            privfile.write_file(path, text)  # 0600: it holds the guest's names and data
        except OSError as e:
            self.notify(f"cannot write {path}: {e.strerror}", severity="error")
            return
        self.notify(f"wrote {path}")


def run_replay(path: str) -> int:
    """`fsinspect replay FILE`: the UI over a recording (analysed in the background)."""
    store = Store()
    src = ReplaySource(store, path)
    app = FsInspectApp(src)
    rc = app.run()
    src.stop()
    return int(rc or 0)


def run_attach(ctrl_path: str, title: str | None = None) -> int:
    """`fsinspect attach CTRL_SOCK` (and `fsinspect demo`): the UI live on a proxy's control socket.

    Connects before the UI starts (raises ConnectionError with a one-line message if it cannot).
    """
    store = Store()
    src = AttachSource(store, ctrl_path)
    src.connect()
    if title:
        store.title = title
    app = FsInspectApp(src, title=title)
    rc = app.run()
    src.stop()
    return int(rc or 0)

