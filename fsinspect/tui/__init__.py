"""The Textual UI (the only package that imports textual): `app.run_replay` and `app.run_attach`."""
