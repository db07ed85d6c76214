"""Commands: orchestration only. Each is a plain Python function taking a config
dataclass and returning its :class:`optamal.runs.Run`; the CLI is a thin shell over them."""
