"""Headless Chromium for the results-page tests: Debian's ``chromium`` driven by Playwright.

Nothing is downloaded: Playwright is pointed at the system browser (``/usr/bin/chromium``, or
``$CHROMIUM``), started with the flags that keep it off the network (no background services, no
component updates). ``.ci/run`` installs the package where it is missing.

Also a command, to take the README's screenshot with the same browser::

    python -m tests.browser screenshot results/<run>/index.html docs/results_page.png
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions"]


def chromium_path() -> str | None:
    """The system Chromium, or ``None``."""
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def unavailable() -> str | None:
    """Why the browser tests cannot run here (``None`` when they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -r requirements-dev.txt)"
    if chromium_path() is None:
        return "no Chromium (apt-get install chromium, as .ci/run does)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000):
    """A fresh browser page (a Playwright ``Page``) at ``width`` x ``height`` CSS pixels."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=FLAGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
            yield context.new_page()
        finally:
            browser.close()


def screenshot(page_file: Path, out: Path, select: int | None = None) -> None:
    """A screenshot of the results page ``page_file`` (with row ``select`` chosen) to ``out``."""
    with chromium(1400, 900) as page:
        page.goto(page_file.resolve().as_uri())
        page.wait_for_load_state("load")
        if select is not None:
            page.click(f'#images tbody tr[data-index="{select}"]')
        page.wait_for_function("() => document.getElementById('viewer-img').complete")
        page.screenshot(path=str(out))


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5) or sys.argv[1] != "screenshot":
        sys.exit("usage: python -m tests.browser screenshot PAGE.html OUT.png [ROW]")
    screenshot(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) == 5 else None)
