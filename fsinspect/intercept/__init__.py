"""The debugger's policy side: hold rules, verdicts (release, answer, delay, rewrite, drop) and control v2."""
