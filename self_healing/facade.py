"""`forwarded`: an attribute of a facade that lives on one of its parts.

The callback, the watchdog and the engine were split into parts; their old attribute names stay
(other modules, users' code and saved habits read them), each read and assignment going to the part
that now owns the value."""

from __future__ import annotations


def forwarded(part: str, name: str, doc: str | None = None) -> property:
    """`self.<part>.<name>`, read and written, as a property of the facade."""
    return property(lambda self: getattr(getattr(self, part), name),
                    lambda self, value: setattr(getattr(self, part), name, value),
                    doc=doc or f"`{part}.{name}`")
