"""Stand-in pair translators for the wiring tests (see messages_chat.py)."""

from __future__ import annotations

from pathlib import Path

DIRECTORY = str(Path(__file__).resolve().parent)


def install() -> None:
    """Let the registry find a stand-in for a pair whose real module is still absent."""
    import plano_extproc.translate as translate

    if DIRECTORY not in translate.__path__:
        translate.__path__.append(DIRECTORY)
