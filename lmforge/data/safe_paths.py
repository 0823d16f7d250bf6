"""Local paths built from names that someone else chose: object keys, shard names in an index.

Whoever can write to a bucket (or to a prepared data set's ``index.json``) chooses those names. A
key suffix of ``/etc/cron.d/x`` joined to a cache directory *replaces* it (pathlib keeps the
absolute part), and ``../../x`` walks out of it: either way a fetch would write, or a reader read,
outside the directory it was given. :func:`path_under` is the one place that turns such a name
into a local path, and it refuses every name that does not stay inside.
"""

from __future__ import annotations

from pathlib import Path


class UnsafeName(ValueError):
    """A name from storage that would resolve outside the local directory it belongs in."""


def check_relative(name: str, *, what: str) -> str:
    """``name`` itself when it is a plain relative path (``a/b.bin``); else :class:`UnsafeName`.

    Refused: empty names, absolute ones, and any empty (``a//b``), ``.`` or ``..`` component;
    ``a//b`` would alias ``a/b`` and hide which object a local file came from.
    """
    parts = name.split("/")
    if not name or name.startswith("/") or "\x00" in name or any(part in ("", ".", "..") for part in parts):
        raise UnsafeName(
            f"{what} {name!r} is not a plain relative name (no leading '/', no empty, '.' or '..' parts), so it "
            "could point outside its directory; refused: rename or delete that object"
        )
    return name


def path_under(root: Path, name: str, *, what: str) -> Path:
    """``root / name``, refused (:class:`UnsafeName`) unless it stays inside ``root``, links resolved."""
    path = root / check_relative(name, what=what)
    if not path.resolve().is_relative_to(root.resolve()):
        raise UnsafeName(f"{what} {name!r} resolves outside {root} (through a symbolic link); refused")
    return path
