"""One module per `fsinspect` subcommand; each exposes `register(subparsers)`."""
