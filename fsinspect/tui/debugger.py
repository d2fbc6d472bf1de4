"""The debugger in the UI: the Held and Rules panels, and the prompts and the fields form behind b/c/E/d/x/C.

Verdicts go to the source as control-protocol-v2 commands (`Source.command`); the source's `resumed` and
`exchange` messages then update the rows, so what the screen shows is what the proxy did.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar

from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.suggester import Suggester
from textual.widgets import Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from dissectors import edit
from dissectors import fuse as F
from dissectors.spec import fuse as fspec

from ..analysis import Exchange
from ..analysis import exchange as X
from .render import S_HELD, age_text
from .sources import Store

ERRNAMES = sorted(fspec.ERRNO.by_name())
MAX_DELAY_MS = 3_600_000


def errno_value(text: str) -> str | int | None:
    """An errno name (any case) or a positive number; None if it is neither."""
    t = text.strip()
    if t.upper() in fspec.ERRNO.by_name():
        return t.upper()
    if t.isdigit() and 0 < int(t) < 4096:
        return int(t)
    return None


def errno_completions(text: str) -> list[str]:
    word = text.strip().upper()
    return [n for n in ERRNAMES if n.startswith(word) and n != word] if word else []


class ErrnoSuggester(Suggester):
    def __init__(self) -> None:
        super().__init__(use_cache=False, case_sensitive=True)

    async def get_suggestion(self, value: str) -> str | None:
        opts = errno_completions(value)
        return opts[0] if opts else None


class HeldPanel(OptionList):
    """Every exchange a breakpoint holds, oldest first; hidden while nothing is held.  Enter shows it."""

    DEFAULT_CSS = """
    HeldPanel { height: auto; max-height: 8; display: none; border: round $warning; }
    HeldPanel.some { display: block; }
    """

    def __init__(self, store: Store, **kw: Any) -> None:
        super().__init__(**kw)
        self.store = store
        self.rows: list[Exchange] = []
        self._sig: tuple[Any, ...] | None = None
        self.border_title = "Held (c continue, E errno, d delay, x edit, C all)"

    def refresh_from_store(self) -> None:
        with self.store.lock:
            held = self.store.held()
        now, mono = self.store.now()
        sig = tuple((ex.n, ex.held, age_text(ex, now, mono)) for ex in held)
        if sig == self._sig:
            return
        self._sig = sig
        keep = self.highlighted
        self.rows = held
        self.clear_options()
        for ex in held:
            t = Text(no_wrap=True)
            t.append(f" HELD {ex.held} ", S_HELD)
            t.append(f" #{ex.n} {ex.opname} unique={ex.unique} nodeid={ex.nodeid} ")
            t.append(f"{self.store.path(ex.index)}  ", "dim")
            t.append(age_text(ex, now, mono) or "", "yellow")
            self.add_option(Option(t))
        self.set_class(bool(held), "some")
        if held:
            self.highlighted = min(keep or 0, len(held) - 1)

    @property
    def current(self) -> Exchange | None:
        i = self.highlighted
        return self.rows[i] if i is not None and 0 <= i < len(self.rows) else None


class RulesPanel(OptionList):
    """The breakpoints and injections in force (the handler's `rules`), with their hits; hidden while none.

    `u` removes the highlighted one, `U` all of them: the engine's table, not just this list.
    """

    DEFAULT_CSS = """
    RulesPanel { height: auto; max-height: 6; display: none; border: round $accent; }
    RulesPanel.some { display: block; }
    """

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.rules: list[dict[str, Any]] = []
        self.border_title = "Rules (u remove, U remove all)"

    def set_rules(self, rules: list[dict[str, Any]]) -> None:
        if rules == self.rules:
            return
        keep = self.highlighted
        self.rules = rules
        self.clear_options()
        for r in rules:
            t = Text(no_wrap=True)
            t.append(f" {r.get('rule_id')} ", "bold")
            t.append(f"{r.get('kind', '')} ", "dim")
            t.append(f"{r.get('rule', '')}   ")
            left = r.get("left")
            t.append(f"hits {r.get('hits', 0)}" + (f", {left} left" if left is not None else ""), "dim")
            self.add_option(Option(t))
        self.set_class(bool(rules), "some")
        if rules:
            self.highlighted = min(keep or 0, len(rules) - 1)

    @property
    def current(self) -> dict[str, Any] | None:
        i = self.highlighted
        return self.rules[i] if i is not None and 0 <= i < len(self.rules) else None


class PromptScreen(ModalScreen[str | None]):
    """One line of input over the app (go to, breakpoint, errno, delay): Enter returns it, Esc cancels.

    `check` validates it as you type and on Enter: a reason (shown under the line) keeps the prompt open.
    """

    DEFAULT_CSS = """
    PromptScreen { align: center middle; }
    PromptScreen > Vertical { width: 70; height: auto; border: thick $accent; background: $surface; padding: 0 1; }
    PromptScreen #perr { color: $text-muted; }
    PromptScreen #perr.bad { color: $error; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, *, value: str = "", check: Callable[[str], str | None] | None = None,
                 complete: Callable[[str], list[str]] | None = None, suggester: Suggester | None = None,
                 hint: str = "", placeholder: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.value = value
        self.check = check
        self.complete = complete
        self.suggester = suggester
        self.hint = hint
        self.placeholder = placeholder

    def compose(self) -> Any:
        with Vertical():
            yield Label(self.title_text)
            box = Input(value=self.value, suggester=self.suggester, placeholder=self.placeholder, id="pinput")
            box.cursor_blink = False
            yield box
            yield Static(self.hint, id="perr")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def _error(self, value: str) -> str | None:
        err = self.check(value) if self.check is not None else None
        msg = self.query_one("#perr", Static)
        msg.set_class(err is not None, "bad")
        opts = self.complete(value) if self.complete is not None else []
        msg.update(err or (self.hint + (f"   completions: {' '.join(opts[:8])}" if opts else "")))
        return err

    def on_input_changed(self, event: Input.Changed) -> None:
        self._error(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if self._error(event.value) is None:
            self.dismiss(event.value.strip())

    def on_key(self, event: events.Key) -> None:
        box = self.query_one(Input)
        if event.key == "tab" and self.complete is not None and box.has_focus:
            opts = self.complete(box.value)
            if opts:
                box.value = opts[0]
                box.cursor_position = len(box.value)
            event.prevent_default()
            event.stop()

    def action_cancel(self) -> None:
        self.dismiss(None)


class FieldsScreen(ModalScreen[dict[str, Any] | None]):
    """The reply's decoded fields as a form (`x`): the values go through the codecs before they are sent.

    Dismissed with the fields that differ from the base (the held reply, or zeros for a held request),
    dotted paths as `dissectors.edit` names them.
    """

    DEFAULT_CSS = """
    FieldsScreen { align: center middle; }
    FieldsScreen > Vertical { width: 90; height: 90%; border: thick $accent; background: $surface; padding: 0 1; }
    FieldsScreen VerticalScroll { height: 1fr; }
    FieldsScreen Horizontal { height: 1; }
    FieldsScreen Horizontal Label { width: 34; }
    FieldsScreen Horizontal Input { width: 1fr; height: 1; border: none; padding: 0; }
    FieldsScreen #ferr { height: auto; color: $text-muted; }
    FieldsScreen #ferr.bad { color: $error; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel"),
                                             Binding("ctrl+s", "submit", "Send")]

    def __init__(self, ex: Exchange) -> None:
        super().__init__()
        self.ex = ex
        self.base = ex.reply if isinstance(ex.reply, F.Reply) and ex.held == X.HELD_REPLY else None
        self.fields = edit.editable_fields(ex.opcode, self.base)
        self.verb = "rewrite the reply" if ex.held == X.HELD_REPLY else "answer the request"

    def compose(self) -> Any:
        with Vertical():
            yield Label(f"#{self.ex.n} {self.ex.opname}: {self.verb} with these fields (Enter or ctrl+s sends, "
                        "Esc cancels)")
            with VerticalScroll():
                for i, f in enumerate(self.fields):
                    with Horizontal():
                        yield Label(f.path)
                        box = Input(value=str(f.value), id=f"f{i}")
                        box.cursor_blink = False
                        yield box
            yield Static("", id="ferr")

    def on_mount(self) -> None:
        if self.fields:
            self.query_one("#f0", Input).focus()

    def changed(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, f in enumerate(self.fields):
            v = self.query_one(f"#f{i}", Input).value
            if v != str(f.value):
                out[f.path] = v if f.kind == "text" else _int_or_text(v)
        return out

    def check(self) -> str | None:
        try:
            edit.encode_fields(self.ex.opcode, self.changed(), unique=self.ex.unique, reply=self.base)
        except edit.FieldError as e:
            return str(e)
        return None

    def on_input_changed(self, event: Input.Changed) -> None:
        err = self.check()
        msg = self.query_one("#ferr", Static)
        msg.set_class(err is not None, "bad")
        msg.update(err or f"ok: {len(self.changed())} field(s) changed")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_submit()

    def action_submit(self) -> None:
        if self.check() is None:
            self.dismiss(self.changed())

    def action_cancel(self) -> None:
        self.dismiss(None)


def _int_or_text(v: str) -> int | str:
    """A form's integer field as a number (what a script would send); left as typed if it is none."""
    try:
        return int(v.strip(), 0)
    except ValueError:
        return v


def delay_error(text: str) -> str | None:
    t = text.strip().removesuffix("ms")
    if not t.isdigit() or not 0 < int(t) <= MAX_DELAY_MS:
        return f"a delay in milliseconds, 1..{MAX_DELAY_MS}"
    return None


def errno_error(text: str) -> str | None:
    return None if errno_value(text) is not None else "an errno name (ENOENT, EIO, ...) or number"


def op_rule(ex: Exchange | None) -> str:
    """The breakpoint `b` offers when no filter is applied: the selected exchange's opcode."""
    return f"op == {ex.opname}" if ex is not None and ex.opcode >= 0 else "op == "


def strip_ms(text: str) -> int:
    return int(re.sub(r"ms$", "", text.strip()))
