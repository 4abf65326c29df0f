"""Public text that arrives through Debian's package archive, read at run time and never committed.

* English: Jane Austen's six novels (public domain) from `r-cran-janeaustenr`, stored there as an R
  lazy-load database and read with the `rdata` package.
* Chinese: the fortune files of `fortunes-zh` (GPL-3+): Tang and Song poems and modern prose.

Each package is fetched once with `apt-get download` and unpacked with `dpkg -x` into the cache.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path

from .. import atomic
from ..cache import cache_dir
from ..errors import CompressError

AUSTEN_PACKAGE = "r-cran-janeaustenr"
CHINESE_PACKAGE = "fortunes-zh"
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
CHINESE_FILES = ("chinese", "tang300", "song100")


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def debian_package(name: str) -> Path:
    """The unpacked root of Debian package `name` in the cache (fetched on first use)."""
    final = cache_dir("sources") / name
    if final.is_dir() and any(final.iterdir()):
        return final
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise CompressError(f"Debian package '{name}' is needed for the built-in text sets, but apt-get/dpkg are missing")
    with tempfile.TemporaryDirectory() as tmp:
        got = _run(["apt-get", "download", name], Path(tmp))
        if got.returncode != 0:  # a fresh machine may have no package lists yet
            _run(["apt-get", "update", "-qq"], Path(tmp))
            got = _run(["apt-get", "download", name], Path(tmp))
        debs = sorted(Path(tmp).glob(f"{name}_*.deb"))
        if got.returncode != 0 or not debs:
            reason = (got.stderr.strip().splitlines() or ["no .deb downloaded"])[-1]
            raise CompressError(f"cannot fetch Debian package '{name}': {reason}")
        with atomic.staged_dir(final, overwrite=True, replaceable=atomic.own_cache) as out:
            unpacked = _run(["dpkg", "-x", str(debs[0]), str(out)], Path(tmp))
            if unpacked.returncode != 0:
                raise CompressError(f"cannot unpack {debs[0].name}: {unpacked.stderr.strip()}")
    return final


@functools.cache
def austen_novels() -> dict[str, str]:
    """Novel name → full text (lines joined with newlines), read from the package's R data files."""
    import rdata

    base = debian_package(AUSTEN_PACKAGE) / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that the .rdx index has no RDS extension
        index = rdata.conversion.convert(rdata.parser.parse_file(base.with_suffix(".rdx")))
        blob = base.with_suffix(".rdb").read_bytes()
        novels = {}
        for name in AUSTEN_NOVELS:
            offset, length = (int(x) for x in index["variables"][name])
            raw = zlib.decompress(blob[offset + 4 : offset + length])  # 4-byte length, then zlib data
            lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
            novels[name] = "\n".join(str(line) for line in lines)
    return novels


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@functools.cache
def chinese_entries() -> tuple[str, ...]:
    """Every fortune of fortunes-zh, in file order, with its terminal colour codes removed."""
    root = debian_package(CHINESE_PACKAGE) / "usr/share/games/fortunes"
    entries = []
    for name in CHINESE_FILES:
        text = (root / name).read_text(encoding="utf-8")
        while _ANSI.search(text):  # the files hold some nested, malformed codes: strip until none are left
            text = _ANSI.sub("", text)
        entries += [e.strip() for e in re.split(r"^%$", text, flags=re.M) if e.strip()]
    return tuple(entries)
