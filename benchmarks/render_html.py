"""Check that an HTML report page renders in headless Chromium and is self-contained.

    .venv/bin/python benchmarks/render_html.py PAGE.html [--png OUT.png] [--chromium PATH]

Chromium is `--chromium`, else $CHROMIUM, else chromium / chromium-browser / google-chrome / headless_shell
on PATH, else the Chromium shipped inside the npm package @sparticuz/chromium (x86_64 Linux, needs node and
npm), unpacked once into ~/.cache/edgetl/chromium. The page is opened at 1400x2000 and given a short virtual
time budget so inline scripts and images settle; then a PNG screenshot is saved (default PAGE.png beside the
page) and the DOM is read back. Prints JSON: Chromium version, PNG size, whether the PNG is blank (one
colour), the count of <tr> and <img> in the DOM, and whether every <img> is a data: URI. Exits 1 when no
Chromium can be found or fetched, the page has no table rows, the screenshot is blank, an image is broken
or an image is not a data: URI.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import platform
import select
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

WIDTH, HEIGHT = 1400, 2000
VIRTUAL_TIME_BUDGET_MS = 2000
TIMEOUT_S = 60
ON_PATH = ["chromium", "chromium-browser", "google-chrome", "headless_shell"]
NPM_PACKAGE = "@sparticuz/chromium@153"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgetl" / "chromium"
# --no-sandbox: we run as root in CI and containers, and the Lambda build has no setuid sandbox helper.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio", "--no-first-run",
         "--no-default-browser-check", "--remote-debugging-pipe"]
# executablePath() unpacks the browser, fonts and SwiftShader under $TMPDIR, but the NSS/expat libraries
# only on AWS; we unpack them too, so a machine without libnss3 can run the binary.
UNPACK_JS = """
import chromium, { inflate } from "@sparticuz/chromium";
await inflate(process.argv[1]);
console.log(await chromium.executablePath());
"""
FONTS_CONF = """<?xml version="1.0"?>
<!DOCTYPE fontconfig SYSTEM "fonts.dtd">
<fontconfig>
  <include ignore_missing="yes">/etc/fonts/fonts.conf</include>
  <dir>{fonts}</dir>
  <cachedir>{fonts}-cache</cachedir>
</fontconfig>
"""


def find_chromium(explicit: str | None) -> Path:
    for given, where in [(explicit, "--chromium"), (os.environ.get("CHROMIUM"), "$CHROMIUM")]:
        if given and not os.access(given, os.X_OK):
            sys.exit(f"render_html: {where} {given} is not an executable file")
    for candidate in [explicit, os.environ.get("CHROMIUM"), *map(shutil.which, ON_PATH)]:
        if candidate:
            return Path(candidate)
    binary = CACHE / "bin" / "chromium"
    return binary if binary.exists() else fetch_chromium(binary)


def fetch_chromium(binary: Path) -> Path:
    """Install @sparticuz/chromium with npm and unpack its brotli-compressed Chromium into binary's folder."""
    tried = f"no Chromium: none given with --chromium or $CHROMIUM, none of {', '.join(ON_PATH)} on PATH"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        sys.exit(f"render_html: {tried}, and {NPM_PACKAGE} ships one for x86_64 Linux only")
    if not (shutil.which("npm") and shutil.which("node")):
        sys.exit(f"render_html: {tried}, and no npm/node to fetch {NPM_PACKAGE}; install one (e.g. apt-get "
                 "install chromium) or pass --chromium PATH")
    print(f"render_html: fetching {NPM_PACKAGE} into {CACHE} (once, about 70 MB)", file=sys.stderr)
    npm_dir = CACHE / "npm"
    npm_dir.mkdir(parents=True, exist_ok=True)
    run_or_exit(["npm", "install", "--prefix", str(npm_dir), "--no-audit", "--no-fund", "--loglevel=error",
                 NPM_PACKAGE], cwd=npm_dir)
    # Unpack into a fresh folder and rename it into place, so an interrupted run leaves no half-written binary.
    unpack_dir = Path(tempfile.mkdtemp(dir=CACHE, prefix="unpack-"))
    al2023 = npm_dir / "node_modules" / "@sparticuz" / "chromium" / "bin" / "al2023.tar.br"
    try:
        run_or_exit(["node", "--input-type=module", "-e", UNPACK_JS, str(al2023)], cwd=npm_dir,
                    env={**os.environ, "TMPDIR": str(unpack_dir)})
        (unpack_dir / "fonts.conf").write_text(FONTS_CONF.format(fonts=binary.parent / "fonts" / "fonts"))
        shutil.rmtree(binary.parent, ignore_errors=True)
        unpack_dir.rename(binary.parent)
    finally:
        shutil.rmtree(unpack_dir, ignore_errors=True)
    run_or_exit([str(binary), "--version"], env=chromium_env(binary))
    return binary


def run_or_exit(command: list[str], **kwargs) -> None:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        sys.exit(f"render_html: `{' '.join(command[:3])} ...` failed ({done.returncode}):\n{done.stderr[-2000:]}")


def chromium_env(binary: Path) -> dict[str, str]:
    """The environment for binary: the unpacked npm Chromium needs its own libraries and fonts."""
    env = dict(os.environ)
    libs = binary.parent / "al2023" / "lib"
    if libs.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
    if (binary.parent / "fonts.conf").exists():
        env["FONTCONFIG_FILE"] = str(binary.parent / "fonts.conf")
    return env


class DevTools:
    """Chrome DevTools Protocol over --remote-debugging-pipe: NUL-terminated JSON on the child's fds 3 and 4.

    Used rather than --dump-dom/--screenshot because the @sparticuz build never exits in that mode (it hangs
    even on about:blank), while the protocol works with it and with any other Chromium.
    """

    def __init__(self, binary: Path, flags: tuple[str, ...] = (), timeout: float = TIMEOUT_S, webgpu: bool = False):
        """``webgpu``: give pages a WebGPU adapter (SwiftShader's, on the CPU, where there is no GPU) instead of
        --disable-gpu."""
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        # Copy the child's ends above fd 4 first, so that moving them onto 3 and 4 cannot clobber each other.
        child_in, child_out = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5) for fd in (to_browser_read, from_browser_write))
        self._profile = tempfile.TemporaryDirectory(prefix="render_html-")
        self._log = open(Path(self._profile.name) / "chromium.log", "w+")  # closed in close()
        self.process = subprocess.Popen(
            [str(binary), *(f for f in FLAGS if not (webgpu and f == "--disable-gpu")),
             *(("--enable-unsafe-webgpu",) if webgpu else ()), *flags, f"--user-data-dir={self._profile.name}"],
            env=chromium_env(binary),
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, close_fds=False, start_new_session=True,
            preexec_fn=lambda: (os.dup2(child_in, 3), os.dup2(child_out, 4)))
        for fd in (to_browser_read, from_browser_write, child_in, child_out):
            os.close(fd)
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._buffer, self._backlog, self._last_id = b"", [], 0

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            sys.exit(f"render_html: Chromium exited early{self._log_tail()}")
        reply = self._wait(lambda m: m.get("id") == self._last_id)
        if "error" in reply:
            sys.exit(f"render_html: Chromium refused {method}: {reply['error'].get('message')}")
        return reply["result"]

    def wait_event(self, method: str) -> dict:
        return self._wait(lambda m: m.get("method") == method).get("params", {})

    def _wait(self, wanted) -> dict:
        for message in self._backlog:
            if wanted(message):
                self._backlog.remove(message)
                return message
        while True:
            while b"\0" not in self._buffer:
                left = self._deadline - time.monotonic()
                if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                    sys.exit(f"render_html: Chromium did not answer within {self._timeout} s{self._log_tail()}")
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    sys.exit(f"render_html: Chromium exited early{self._log_tail()}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            message = json.loads(raw)
            if wanted(message):
                return message
            self._backlog.append(message)

    def _log_tail(self) -> str:
        self._log.seek(0)
        return ":\n" + self._log.read()[-2000:]

    def close(self) -> None:
        # The whole process group: Chromium's helper processes outlive the main one for a moment and kept writing
        # into the profile while it was being removed (an intermittent "Directory not empty" in the web tests).
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        self._log.close()
        self._profile.cleanup()


def render(binary: Path, page: Path, png: Path) -> tuple[str, str, int]:
    """Open page, save a screenshot to png; return the browser version, the DOM and the count of broken images."""
    browser = DevTools(binary)
    try:
        version = browser.call("Browser.getVersion")["product"]
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        tab = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.call("Emulation.setDeviceMetricsOverride", tab, width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                     mobile=False)
        browser.call("Page.enable", tab)
        navigation = browser.call("Page.navigate", tab, url=page.as_uri())
        if navigation.get("errorText"):
            sys.exit(f"render_html: Chromium could not open {page}: {navigation['errorText']}")
        browser.wait_event("Page.loadEventFired")
        # What --virtual-time-budget does: timers started by the page run on a fast clock until it is spent.
        browser.call("Emulation.setVirtualTimePolicy", tab, policy="pauseIfNetworkFetchesPending",
                     budget=VIRTUAL_TIME_BUDGET_MS)
        browser.wait_event("Emulation.virtualTimeBudgetExpired")
        shot = browser.call("Page.captureScreenshot", tab, format="png")["data"]
        png.write_bytes(base64.b64decode(shot))
        dom = evaluate(browser, tab, "document.documentElement.outerHTML")
        broken = evaluate(browser, tab, "[...document.images].filter(i => !i.complete || !i.naturalWidth).length")
        return version, dom, broken
    finally:
        browser.close()


def evaluate(browser: DevTools, tab: str, expression: str):
    return browser.call("Runtime.evaluate", tab, expression=expression, returnByValue=True)["result"]["value"]


class TagCounter(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.image_sources = 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows += 1
        elif tag == "img":
            self.image_sources.append(dict(attrs).get("src") or "")


def is_blank(png: Path) -> bool:
    from PIL import Image

    with Image.open(png) as image:
        return all(low == high for low, high in image.convert("RGB").getextrema())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", type=Path)
    parser.add_argument("--png", type=Path, help="screenshot path (default: PAGE.png beside the page)")
    parser.add_argument("--chromium", help="Chromium binary (default: $CHROMIUM, PATH, then npm)")
    args = parser.parse_args()
    page = args.page.resolve()
    if not page.is_file():
        sys.exit(f"render_html: no such page: {args.page}")
    png = (args.png or page.with_suffix(".png")).resolve()
    start = time.perf_counter()
    binary = find_chromium(args.chromium)
    version, dom, broken_images = render(binary, page, png)
    tags = TagCounter()
    tags.feed(dom)
    external = [src[:80] for src in tags.image_sources if not src.startswith("data:")]
    report = {"page": str(page), "chromium": str(binary), "version": version, "png": str(png),
              "png_bytes": png.stat().st_size, "png_blank": is_blank(png), "table_rows": tags.rows,
              "images": len(tags.image_sources), "images_broken": broken_images,
              "images_all_data_uri": not external, "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps(report, indent=2))
    problems = [message for failed, message in [
        (tags.rows == 0, "the page has no table rows (<tr>)"),
        (report["png_blank"], f"the screenshot {png} is blank (one colour)"),
        (broken_images > 0, f"{broken_images} image(s) did not load"),
        (bool(external), f"images not embedded as data: URIs: {external}"),
    ] if failed]
    if problems:
        sys.exit("render_html: FAILED: " + "; ".join(problems))
    return 0


if __name__ == "__main__":
    sys.exit(main())
