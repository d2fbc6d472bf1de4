"""The single source of truth: declarative tables every codec, renderer and generator derives from."""
