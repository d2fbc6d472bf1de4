"""Control protocol version 2, server side: client commands -> Intercept verdicts and rule changes.

The hub (fsinspect/live/hub.py) reads one JSON object a line from each client and calls
`Control.handle(client_id, obj)`, which answers at once (it never blocks: verdicts are native calls or
hand-offs to the source's own threads, and delays are timers).  Every command gets exactly one reply:

  {"type": "reply", "id": <the command's id>, "ok": true, ...}
  {"type": "reply", "id": <the command's id>, "ok": false, "error": "<reason>"}

Commands (`{"id": 1, "cmd": "<name>", ...}`; `n` is the exchange number every message carries):

  held                                  -> "held": [exchange + "direction", "rule_id"]
  release     {"n"}                     forward a held request / deliver a held reply as it is
  answer      {"n", "errno": "EACCES"|13} or {"n", "fields": {...reply args...}}
                                        reply to a held request (the back-end never sees it)
  delay       {"n", "ms"}               release it after ms milliseconds
  rewrite     {"n", "errno"} or {"n", "fields": {...}}   change a held reply (fields overlay the decoded one)
  drop        {"n"}                     complete a held FORGET/BATCH_FORGET without forwarding it
  continue-all                          release everything a breakpoint holds -> "released": [n...]
  rules                                 -> "rules": [{"rule_id", "rule", "kind", "action", "hits", "left"}]
  add-rule    {"rule": "op == MKDIR"}   the --break/--inject syntax (a rule with errno=/delay=/reply-errno= is an
                                        inject, else a break) -> "rule_id"; a bad rule: "error" with the caret
                                        lines and "column"
  remove-rule {"rule_id"}
  counters                              -> what the debugger did so far (held, released, answered, ...)

Server -> every client, besides version 1's messages: `{"type": "held", "n", "direction", ...exchange}`
when a breakpoint holds something, `{"type": "resumed", "n", "how"}` (released, answered, delayed,
rewritten, dropped) when it goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .addon import Intercept, InterceptError
from .rules import RuleError, parse_rule

PROTOCOL_VERSION = 2

Reply = dict[str, Any]


class Control:
    """Command handler for one source's hub; `install` plugs it in and announces version 2."""

    def __init__(self, intercept: Intercept) -> None:
        self.intercept = intercept
        self._commands: dict[str, Callable[[dict[str, Any]], Reply]] = {
            "held": lambda o: {"held": intercept.held()},
            "release": lambda o: intercept.release(o.get("n")),
            "answer": lambda o: intercept.answer(o.get("n"), o.get("errno"), o.get("fields")),
            "delay": lambda o: intercept.delay(o.get("n"), o.get("ms")),
            "rewrite": lambda o: intercept.rewrite(o.get("n"), o.get("errno"), o.get("fields")),
            "drop": lambda o: intercept.drop(o.get("n")),
            "continue-all": lambda o: {"released": [e["n"] for e in intercept.continue_all()]},
            "rules": lambda o: {"rules": intercept.rules()},
            "add-rule": self._add_rule,
            "remove-rule": self._remove_rule,
            "counters": lambda o: {"counters": intercept.describe_counters()},
        }

    def install(self, hub: Any) -> None:
        hub.command_handler = self.handle
        hub.protocol_version = PROTOCOL_VERSION
        def publish(ev: dict[str, Any]) -> None:
            if not ev.get("auto"):  # a rule's instant decision: clients follow the exchange itself
                hub.publish_message(ev)

        self.intercept.listeners.append(publish)

    def handle(self, client_id: int, obj: dict[str, Any]) -> Reply:
        cid = obj.get("id")
        cmd = obj.get("cmd")
        if not isinstance(cmd, str):
            return _error(cid, f"a command needs \"cmd\" (one of: {', '.join(self._commands)})")
        fn = self._commands.get(cmd)
        if fn is None:
            return _error(cid, f"unknown command {cmd!r} (one of: {', '.join(self._commands)})")
        try:
            out = fn(obj)
        except RuleError as e:
            return {**_error(cid, str(e)), "column": e.column}
        except InterceptError as e:
            return _error(cid, str(e))
        out = {k: v for k, v in out.items() if k != "type"}
        return {"type": "reply", "id": cid, "ok": True, **out}

    def _add_rule(self, obj: dict[str, Any]) -> Reply:
        text = obj.get("rule")
        if not isinstance(text, str):
            raise InterceptError("add-rule needs \"rule\": a string such as 'op == MKDIR'")
        rule = parse_rule(text)
        return {"rule_id": self.intercept.add_rule(rule), "rule": rule.describe(), "kind": rule.kind}

    def _remove_rule(self, obj: dict[str, Any]) -> Reply:
        rid = obj.get("rule_id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            raise InterceptError(f"remove-rule needs \"rule_id\" (a number), not {rid!r}")
        rule = self.intercept.remove_rule(rid)
        return {"rule_id": rid, "rule": rule.describe()}


def _error(cid: Any, reason: str) -> Reply:
    return {"type": "reply", "id": cid, "ok": False, "error": reason}
