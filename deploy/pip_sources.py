"""The host's pip sources, as options for a container build (used by deploy/build-image.sh).

Reads ``python3 -m pip config list`` (files and PIP_* variables) and prints, one a line:

    option --find-links /opt/wheels       pip options naming where packages come from
    mount /opt/wheels                     local paths those options need inside the build

Only the keys that say where packages come from are passed (index-url, extra-index-url,
find-links, trusted-host, cert, client-cert); constraints and other settings stay on the host.
A local file:// index at ``.../simple`` is mounted from its parent, as such indexes often
link to files beside ``simple`` (``../../files/...``).  Local paths are mounted at the same
path, so the options work unchanged inside the build.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

KEYS = ("index-url", "extra-index-url", "find-links", "trusted-host", "cert", "client-cert")
LISTS = {"extra-index-url", "find-links", "trusted-host"}
# later wins: pip applies [global], then [install], then PIP_* variables
SECTIONS = ("global", "install", ":env:")


def read_config() -> dict[str, str]:
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    found: dict[str, dict[str, str]] = {}
    for line in listing.splitlines():
        name, sep, value = line.partition("=")
        section, dot, key = name.rpartition(".")
        if not (sep and dot) or key not in KEYS or section not in SECTIONS:
            continue
        found.setdefault(key, {})[section] = shlex.split(value)[0] if value.strip() else ""
    return {key: next(by[s] for s in reversed(SECTIONS) if s in by) for key, by in found.items()}


def local_path(value: str) -> Path | None:
    """The local path a source names (a path or a file:// URL), else None."""
    if value.startswith("file:"):
        return Path(unquote(urlparse(value).path))
    if "://" in value:
        return None
    return Path(value)


def main() -> None:
    mounts: list[Path] = []
    for key, value in read_config().items():
        for item in value.split() if key in LISTS else [value]:
            if not item:
                continue
            path = None if key == "trusted-host" else local_path(item)
            if path is not None:
                if not path.exists():
                    print(f"pip_sources: skipping {key} {item}: {path} does not exist", file=sys.stderr)
                    continue
                path = path.absolute()
                mounts.append(path.parent if path.name == "simple" and key.endswith("index-url") else path)
            print(f"option --{key} {item}")
    for path in dict.fromkeys(mounts):
        print(f"mount {path}")


if __name__ == "__main__":
    main()
