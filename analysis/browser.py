"""Headless Chromium for the report: a PNG of its first screen, and its DOM after scripts ran.

A thin edge over the `chromium` command line (Debian's `chromium` package); no Python browser
library is needed for two calls, and none is a dependency of this project.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from lora_repro.errors import UserError

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = "1280,1600"  # the first screen of the README's example


def chromium() -> str | None:
    """The path of a Chromium binary on PATH, or None."""
    return next((path for name in NAMES if (path := shutil.which(name))), None)


def _run(*args: str, timeout: float = 60) -> str:
    binary = chromium()
    if binary is None:
        raise UserError("headless rendering needs Chromium on PATH (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:  # no shared profile lock between calls
        done = subprocess.run(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--no-first-run",
             "--virtual-time-budget=10000", *args],
            capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise UserError(f"chromium failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return done.stdout


def screenshot(html: Path, png: Path, window: str = WINDOW) -> Path:
    """Render `html` at `window` (w,h pixels) into `png`."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _run(f"--screenshot={png}", f"--window-size={window}", Path(html).resolve().as_uri())
    if not png.is_file():
        raise UserError(f"chromium wrote no screenshot {png}")
    return png


def dump_dom(html: Path) -> str:
    """The DOM of `html` after its scripts ran (the report marks each decoded image)."""
    return _run("--dump-dom", Path(html).resolve().as_uri())
