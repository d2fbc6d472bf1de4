"""The side panels: inode map (with lints), submounts and SYNCFS, stats with rate sparklines, control plane.

Each panel rebuilds from the Store on `refresh_from_store()` (the app calls it when the panel is shown
and then every second while it stays visible), taking the store lock only to copy what it needs.
"""

from __future__ import annotations

import re
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widget import Widget
from textual.widgets import DataTable, Label, OptionList, Sparkline, Static, Tree
from textual.widgets.option_list import Option

from dissectors.render import safe_name
from dissectors.spec import fuse as fspec

from ..analysis import Analyzer
from ..analysis.inodes import ROOT, superblock_label
from ..analysis.render import fmt_ns
from ..analysis.stats import rate_series
from ..analysis.timetravel import moment_of, state_at
from .render import event_text, features_text, number
from .sources import Store

FINE_BELOW_S = 10  # a capture shorter than this many seconds gets sparklines in sub-second buckets
FINE_MAX = 20_000  # a replay decodes its exchanges for sub-second buckets only up to this many
TRAVEL_MAX = 50_000  # a replay's time travel replays from the start: as far as this exchange (~1 s)
MAX_TREE_NODES = 5000  # the Tree widget rebuilds every second while shown; beyond this it would lag


class JumpTo(Message):
    """Show exchange `index` in the exchanges list."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index


class TravelChanged(Message):
    """The inode map switched between "as of the selection" and "now": the app says which exchange."""


class ApplyFilter(Message):
    """Filter the exchanges list on `expr` (Wireshark's Apply as Filter); `narrow` ands it with the filter
    in force ("…and Selected")."""

    def __init__(self, expr: str, *, narrow: bool = False, slowest: bool = False) -> None:
        super().__init__()
        self.expr = expr
        self.narrow = narrow
        self.slowest = slowest  # then sort by latency: the top-N slowest


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.0f}TB"


def superblock_filter(root: str, roots: list[str]) -> str:
    """The exchanges on the superblock mounted at path `root`: under it, and not under a submount in it."""
    def under(p: str) -> str:
        return f'path ~ "^{re.escape(p.rstrip("/"))}(/|$)"' if p != "/" else 'path ~ "^/"'

    inner = [p for p in roots if p != root and p.startswith(root.rstrip("/") + "/")]
    return under(root) + (f" and not ({' or '.join(under(p) for p in inner)})" if inner else "")


class InodePanel(Widget):
    """The kernel's nodeids as a tree by path, submount roots marked; the lints, each jumping to its cause.

    Enter or `a` on a nodeid filters the exchanges on it (space opens and closes a branch).  In a replay
    the map is the one as of the exchange selected in the list (time travel); `T` switches to the end
    state ("now") and back.
    """

    BINDINGS = [Binding("a", "apply", "Apply as filter"), Binding("T", "travel", "As of / now")]

    DEFAULT_CSS = """
    InodePanel { layout: horizontal; height: 1fr; }
    InodePanel #treebox { width: 3fr; }
    InodePanel #asof { height: 1; background: $boost; }
    InodePanel Tree { height: 1fr; }
    InodePanel #lintbox { width: 2fr; border-left: solid $accent; }
    InodePanel OptionList { height: 1fr; border: none; }
    """

    def __init__(self, store: Store, **kw: Any) -> None:
        super().__init__(**kw)
        self.store = store
        self.lint_targets: list[int] = []
        self._sig: tuple[int, int, int, int | None] | None = None
        self._tree_sig: tuple[int, int, int, int | None] | None = None
        self.travel = True  # follow the list's selection (replay); False: the end state
        self.as_of: int | None = None  # the exchange whose moment the map shows (None: now)
        self._past: tuple[int, Analyzer] | None = None

    def compose(self) -> Any:
        tree: Tree[int] = Tree("/", id="itree")
        tree.auto_expand = False  # Enter filters; space toggles
        with Vertical(id="treebox"):
            yield Static("", id="asof")
            yield tree
        with Vertical(id="lintbox"):
            yield Label("lints (Enter: show the exchange)")
            yield OptionList(id="lints")

    def refresh_from_store(self) -> None:
        st = self.store
        with st.lock:
            an = st.analyzer
            sig = (len(st.exchanges), an.count, an.lints.total, self.as_of)
            if sig == self._sig:
                return
            self._sig = sig
            past = self._state_as_of()
            nodes = [(n.nodeid, n.parent, n.name, n.ino, n.generation, n.nlookup, n.attr_flags, n.submount)
                     for n in (past or an).inodes.nodes.values()]
            lints = [(lint.name, lint.exchange, lint.message) for lint in an.lints]
            not_kept = an.lints.not_kept()
        remote = list(st.remote_lints)
        tree = self.query_one("#itree", Tree)
        if not tree.has_focus or self._tree_sig is None:  # not under the user's cursor while they browse it
            self._tree_sig = sig
            self._tree(nodes)
        ol = self.query_one("#lints", OptionList)
        hl = ol.highlighted
        ol.clear_options()
        self.lint_targets = []
        for r in remote:
            ol.add_option(Option(Text.assemble(("(before attach) ", "dim"), (r.get("kind", "?"), "magenta bold"),
                                               " ", r.get("message", ""))))
            self.lint_targets.append(-1)
        for name, idx, msg in lints:
            ol.add_option(Option(Text.assemble((f"#{st.number_of(idx)} ", "dim"), (name, "magenta bold"), " ", msg)))
            self.lint_targets.append(idx)
        for name, n in not_kept:
            ol.add_option(Option(Text.assemble((name, "magenta bold"),
                                               (f" {n:,} more not kept (the most recent are listed)", "dim"))))
            self.lint_targets.append(-1)
        if hl is not None and hl < ol.option_count:
            ol.highlighted = hl

    def _state_as_of(self) -> Analyzer | None:
        """The map as of exchange `as_of` (call with the store lock held); None: now.  Kept for the next tick."""
        st = self.store
        ex = st.get(self.as_of) if self.as_of is not None else None
        head = self.query_one("#asof", Static)
        if ex is None:
            note = "" if st.kind == "replay" else " (a live session shows the map now; time travel is for replays)"
            head.update(Text.assemble(("inode map now", "bold"), note if self.travel else "",
                                      "" if st.kind != "replay" else "  T: as of the selected exchange"
                                      if not self.travel else ""))
            return None
        if st.rec is not None and ex.index >= TRAVEL_MAX:
            head.update(Text.assemble(("inode map now", "bold"), f" (time travel replays the recording from its "
                                      f"start: it goes as far as #{TRAVEL_MAX:,})  T: now"))
            return None
        if self._past is None or self._past[0] != ex.index:
            self._past = (ex.index, state_at(st.exchanges, moment_of(ex)))
        head.update(Text.assemble(("inode map as of ", "bold"), (f"#{number(ex)} {ex.opname}", "bold reverse"),
                                  " (the exchange selected in the list)  T: now"))
        return self._past[1]

    def rebuild(self) -> None:
        """The next refresh rebuilds the tree even under the user's cursor (shown again, or T)."""
        self._tree_sig = None

    def action_travel(self) -> None:
        self.travel = not self.travel
        self.rebuild()
        self.post_message(TravelChanged())

    @property
    def main(self) -> Widget:
        """What takes the focus when the panel is shown."""
        return self.query_one("#itree", Tree)

    def _tree(self, nodes: list[tuple[Any, ...]]) -> None:
        tree = self.query_one("#itree", Tree)
        children: dict[int | None, list[tuple[Any, ...]]] = {}
        byid = {n[0]: n for n in nodes}
        for n in nodes:
            if n[0] == ROOT:
                continue
            parent = n[1] if n[1] in byid else None
            children.setdefault(parent, []).append(n)
        tree.clear()
        root = byid.get(ROOT)
        tree.root.set_label(self._label(root) if root else Text("/"))
        tree.root.expand()

        shown = [0]

        def add(parent_node: Any, pid: int | None, depth: int) -> None:
            for n in sorted(children.get(pid, ()), key=lambda x: (x[2] or b"")):
                if shown[0] >= MAX_TREE_NODES:
                    return
                shown[0] += 1
                kids = children.get(n[0])
                if kids and depth < 64:
                    sub = parent_node.add(self._label(n), expand=depth < 2 or bool(n[7]), data=n[0])
                    add(sub, n[0], depth + 1)
                else:
                    parent_node.add_leaf(self._label(n), data=n[0])

        add(tree.root, ROOT, 0)
        if shown[0] >= MAX_TREE_NODES:
            tree.root.add_leaf(Text(f"… {len(nodes) - shown[0]} more nodeids not shown", "dim"))
        orphans = children.get(None)
        if orphans and shown[0] < MAX_TREE_NODES:
            lost = tree.root.add(Text("(unlinked or parent unknown)", "dim"), expand=True)
            for n in orphans[:MAX_TREE_NODES - shown[0]]:
                lost.add_leaf(self._label(n), data=n[0])

    @staticmethod
    def _label(n: tuple[Any, ...]) -> Text:
        nodeid, _parent, name, ino, gen, nlookup, flags, submount = n
        shown = "/" if nodeid == ROOT else (safe_name(name) if name else "?")
        t = Text(shown, "bold cyan" if submount else "bold")
        if submount:
            t.append(" [SUBMOUNT root]", "reverse cyan")
        t.append(f"  nodeid={nodeid} ino={ino} gen={gen} nlookup={nlookup}", "dim")
        if flags:
            t.append(f" attr.flags={fspec.ATTR_FLAGS.render(flags)}", "cyan")
        return t

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        i = event.option_index
        if 0 <= i < len(self.lint_targets) and self.lint_targets[i] >= 0:
            self.post_message(JumpTo(self.lint_targets[i]))

    def on_tree_node_selected(self, event: Tree.NodeSelected[int]) -> None:
        event.stop()
        self.action_apply()

    def action_apply(self) -> None:
        tree = self.query_one("#itree", Tree)
        node = tree.cursor_node
        if not tree.has_focus or node is None:
            return
        nodeid = ROOT if node is tree.root else node.data
        if nodeid is None:
            self.app.bell()
            return
        self.app.post_message(ApplyFilter(f"nodeid == {nodeid}"))


class SubmountPanel(Widget):
    """One row per superblock (the root and each announced submount), and every SYNCFS with its latency.

    Enter jumps to the row's exchange; `a` filters on the superblock (its exchanges, by path) or on the
    SYNCFS calls of that root.
    """

    BINDINGS = [Binding("a", "apply", "Apply as filter")]

    DEFAULT_CSS = """
    SubmountPanel { layout: vertical; height: 1fr; }
    SubmountPanel DataTable { height: 1fr; }
    SubmountPanel Label { background: $boost; width: 100%; }
    """

    def __init__(self, store: Store, **kw: Any) -> None:
        super().__init__(**kw)
        self.store = store
        self.targets: dict[str, list[int]] = {"sb": [], "sync": []}
        self.filters: dict[str, list[str]] = {"sb": [], "sync": []}
        self._sig: tuple[int, int, int] | None = None

    def compose(self) -> Any:
        yield Label("superblocks (Enter: the announcing exchange; the guest's st_dev for each is the guest "
                    "kernel's and never crosses the wire)")
        yield DataTable(id="sb", cursor_type="row")
        yield Label("SYNCFS calls (Enter: the exchange)")
        yield DataTable(id="sync", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#sb", DataTable).add_columns("root nodeid", "path", "announced by", "ino", "SYNCFS",
                                                     "last SYNCFS latency")
        self.query_one("#sync", DataTable).add_columns("exchange", "superblock", "latency", "result")

    def refresh_from_store(self) -> None:
        st = self.store
        with st.lock:
            an = st.analyzer
            ann = list(an.submounts.announced.values())
            syncs = list(an.submounts.syncfs)
            sig = (len(ann), len(syncs), len(st.exchanges))
            if sig == self._sig:
                return
            self._sig = sig
            paths = {a.nodeid: self._path(a.nodeid, a.parent, a.name) for a in ann}
            spaths = {s.exchange: st.path(s.exchange) if s.exchange >= 0 else paths.get(s.nodeid, "")
                      for s in syncs}
        sb = self.query_one("#sb", DataTable)
        sb.clear()
        self.targets["sb"] = []
        roots: list[tuple[int, str, int, int]] = [(ROOT, "/", -1, 0)]
        roots += [(a.nodeid, paths.get(a.nodeid) or safe_name(a.name), a.exchange, a.ino) for a in ann]
        # A forgotten root still names its superblock: the exchanges were listed with the path they had.
        sb_paths = [r[1].removesuffix(" (forgotten)") for r in roots]
        self.filters["sb"] = [superblock_filter(p, sb_paths) if p.startswith("/") else f"nodeid == {r[0]}"
                              for r, p in zip(roots, sb_paths, strict=True)]
        for nodeid, path, exidx, ino in roots:
            mine = [s for s in syncs if s.nodeid == nodeid]
            last = fmt_ns(mine[-1].latency_ns) if mine else "-"
            sb.add_row(str(nodeid), Text(path, "bold cyan" if nodeid != ROOT else "bold"),
                       f"#{st.number_of(exidx)}" if exidx >= 0 else ("INIT" if nodeid == ROOT else "(before attach)"),
                       str(ino or "-"), str(len(mine)), last)
            self.targets["sb"].append(exidx)
        sy = self.query_one("#sync", DataTable)
        sy.clear()
        self.targets["sync"] = []
        self.filters["sync"] = [f"op == SYNCFS and nodeid == {s.nodeid}" for s in syncs]
        for s in syncs:
            where = Text(superblock_label(s.nodeid, s.path or spaths.get(s.exchange)
                                          or paths.get(s.nodeid, "/" if s.nodeid == ROOT else "")))
            if not s.is_root:  # flag only what is wrong
                where.append("  NOT a superblock root", "red bold")
            sy.add_row(f"#{st.number_of(s.exchange)}" if s.exchange >= 0 else "(before attach)", where, fmt_ns(s.latency_ns),
                       Text(fspec.ERRNO.render(s.error), "red bold") if s.error else Text("ok", "green"))
            self.targets["sync"].append(s.exchange)

    @property
    def main(self) -> Widget:
        return self.query_one("#sb", DataTable)

    def _path(self, nodeid: int, parent: int, name: bytes) -> str:
        """Where the submount root is (or was: a forgotten root is named from its announcement)."""
        inodes = self.store.analyzer.inodes
        if nodeid in inodes.nodes:
            return inodes.path(nodeid)
        base = inodes.path(parent) if parent in inodes.nodes else f"<nodeid {parent}>"
        return f"{base.rstrip('/')}/{safe_name(name)} (forgotten)"

    def action_apply(self) -> None:
        table = self.app.focused
        if not isinstance(table, DataTable) or table.id not in self.filters:
            return
        rows = self.filters[table.id]
        if 0 <= table.cursor_row < len(rows):
            self.app.post_message(ApplyFilter(rows[table.cursor_row]))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        tid = event.data_table.id or ""
        rows = self.targets.get(tid, [])
        r = event.cursor_row
        if 0 <= r < len(rows) and rows[r] >= 0:
            self.post_message(JumpTo(rows[r]))


class StatsPanel(Widget):
    """Per-opcode counts, errors and latency percentiles; ops/s and bytes/s sparklines.

    Enter on an opcode: its exchanges, slowest first (the top-N slowest view).
    """

    DEFAULT_CSS = """
    StatsPanel { layout: vertical; height: 1fr; }
    StatsPanel #rates { height: 6; }
    StatsPanel .spark { height: 3; }
    StatsPanel #totals { height: auto; }
    StatsPanel DataTable { height: 1fr; }
    """

    def __init__(self, store: Store, **kw: Any) -> None:
        super().__init__(**kw)
        self.store = store
        self._sig: int | None = None

    def compose(self) -> Any:
        yield Static("", id="totals")
        with Vertical(id="rates"):
            yield Static("ops/s", id="opslabel")
            yield Sparkline([], id="ops", classes="spark")
            yield Static("bytes/s", id="byteslabel")
            yield Sparkline([], id="bytes", classes="spark")
        yield DataTable(id="ops_table", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#ops_table", DataTable).add_columns("opcode", "count", "errors", "p50", "p90", "p99",
                                                            "max", "req bytes", "reply bytes", "no reply")

    @property
    def main(self) -> Widget:
        return self.query_one("#ops_table", DataTable)

    def refresh_from_store(self) -> None:
        st = self.store
        with st.lock:
            sig = st.analyzer.stats.total
            if sig == self._sig:
                return
            self._sig = sig
            d = st.analyzer.stats.as_dict()
        ops, byts = st.rates(120)
        base = f"last {len(ops)} s with traffic, per 1 s"
        if len(ops) < FINE_BELOW_S and (st.rec is None or len(st.rec) <= FINE_MAX):
            # a few per-second bars would be one solid block: finer buckets
            with st.lock:
                pts = [(e.ts_ns, e.req_len + e.reply_len) for e in st.exchanges if e.ts_ns]
            bucket, ops, byts = rate_series(pts)
            base = f"over {fmt_ns(d['duration_ns'])}, per {fmt_ns(bucket)} bucket"
        self.query_one("#ops", Sparkline).data = ops or [0.0]
        self.query_one("#bytes", Sparkline).data = byts or [0.0]
        self.query_one("#opslabel", Static).update(
            f"ops/s ({base}): now {ops[-1]:.0f}, peak {max(ops):.0f}" if ops else "ops/s")
        self.query_one("#byteslabel", Static).update(
            f"bytes/s: now {_fmt_bytes(byts[-1])}, peak {_fmt_bytes(max(byts))}" if byts else "bytes/s")
        errs = ", ".join(f"{k} {v}" for k, v in list(d["errors"].items())[:8]) or "none"
        self.query_one("#totals", Static).update(
            f"{d['total']} exchanges over {fmt_ns(d['duration_ns'])}; request bytes {d['bytes']['request']}, "
            f"reply bytes {d['bytes']['reply']}; errors: {errs}")
        t = self.query_one("#ops_table", DataTable)
        t.clear()
        for name, o in d["ops"].items():
            lat = o["latency_ns"]
            nerr = sum(o["errors"].values())
            t.add_row(Text(name, "bold"), str(o["count"]), Text(str(nerr), "red bold") if nerr else "0",
                      fmt_ns(lat["p50"]), fmt_ns(lat["p90"]), fmt_ns(lat["p99"]), fmt_ns(lat["max"]),
                      str(o["request_bytes"]), str(o["reply_bytes"]), str(o["unreplied"]), key=name)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        name = event.row_key.value
        if name:
            self.app.post_message(ApplyFilter(f"op == {name}", slowest=True))


class ControlPanel(Widget):
    """The vhost-user side: features offered/acked/masked, regions, vrings, kick/call changes, capture health."""

    DEFAULT_CSS = """
    ControlPanel { layout: horizontal; height: 1fr; }
    ControlPanel #cstate { width: 1fr; }
    ControlPanel #cmsgs { width: 1fr; border-left: solid $accent; }
    """

    def __init__(self, store: Store, **kw: Any) -> None:
        super().__init__(**kw)
        self.store = store
        self._sig: tuple[int, int, int] | None = None

    def compose(self) -> Any:
        with Horizontal():
            with VerticalScroll(id="cstate"):
                yield Static("", id="cstate_text")
            with VerticalScroll(id="cmsgs"):
                yield Static("", id="cmsgs_text")

    @property
    def main(self) -> Widget:
        return self.query_one("#cstate", VerticalScroll)

    def state_lines(self) -> list[str]:
        st = self.store
        f = st.features
        lines = ["FEATURES", *("  " + x for x in features_text(f))]
        regions = f.get("regions") or []
        lines.append(f"MEMORY REGIONS ({len(regions)})")
        for r in regions:
            lines.append(f"  gpa={r.get('guest_address', 0):#x} size={r.get('size', 0):#x} "
                         f"uva={r.get('user_address', 0):#x} mmap_offset={r.get('mmap_offset', 0):#x}")
        vr = f.get("vrings") or {}
        lines.append(f"VRINGS ({len(vr)})")
        for i, v in sorted(vr.items(), key=lambda kv: int(kv[0])):
            lines.append(f"  vring {i}: num={v.get('num')} base={v.get('base')} enabled={v.get('enabled')} "
                         f"started={v.get('started')} kick fd changes={v.get('kick_changes')} "
                         f"call fd changes={v.get('call_changes')}")
        cap = st.capture
        lines.append("CAPTURE HEALTH")
        if cap:
            lines.append(f"  captured {cap.get('captured', 0)}, dropped {cap.get('dropped', 0)}, lossless stalls "
                         f"{cap.get('stalls', 0)} (as of attaching)")
        else:
            lines.append("  proxy capture counters: not in a recording")
        with st.lock:
            dec = st.analyzer.lints.counts["decode-error"]
            snapped = st.snapped_recent()
        lines.append(f"  FUSE decode errors: {dec}; snapped (cut to the snap length, recent): {snapped}")
        what = "records read" if st.kind == "replay" else "messages received"
        lines.append(f"  {what}: {st.received}; messages this UI missed (control-socket overflow): {st.overflow}")
        if st.events:
            lines.append(f"EVENTS ({len(st.events)})")
            for e in list(st.events)[-30:]:
                lines.append(f"  {event_text(e)}")
        return lines

    def refresh_from_store(self) -> None:
        st = self.store
        sig = (len(st.control), len(st.events), st.overflow)
        if sig == self._sig:
            return
        self._sig = sig
        self.query_one("#cstate_text", Static).update("\n".join(self.state_lines()))
        msgs = list(st.control)[-300:]
        text = Text()
        text.append(f"vhost-user messages ({len(st.control)}; last {len(msgs)})\n", "bold")
        for m in msgs:
            d = m.get("direction", "?")
            text.append(f"{d:>16} ", "cyan" if "front" in d else "green")
            text.append(str(m.get("summary", "")) + "\n")
        self.query_one("#cmsgs_text", Static).update(text)
