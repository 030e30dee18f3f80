"""Printed text: counts with the noun in the right number ("1 epoch", "2 epochs")."""

from __future__ import annotations


def count(n, noun: str, plural: str | None = None) -> str:
    """`n noun`, the noun singular for exactly 1 and plural (noun + "s" unless given) else."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
