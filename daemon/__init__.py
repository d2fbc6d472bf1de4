"""The bundled passthrough daemon: engine, passthrough filesystem, transports."""
