"""Reference images: containment, local loading, URL downloads through a real local HTTP server, and the cache."""

import hashlib
import io
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmem.data import (
    ManifestEntry,
    default_cache_dir,
    download_reference,
    fetch_references,
    load_reference,
    read_entries,
    read_manifest,
    resolve_references,
    write_manifest,
)
from diffmem.errors import PromptFileError

SHORT = 0.3  # seconds: the timeout the slow-server tests use
STALL = 5.0  # seconds a slow route would stall; the fixture's finaliser wakes it at once


def png_bytes(color=(200, 30, 30), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def noise_png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


CAT = png_bytes()
NOISE = noise_png_bytes()  # a valid PNG of about 12 kB; the oversize tests set max_bytes just below its length


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(PromptFileError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Never touch the real ~/.cache, and never send 127.0.0.1 requests through a proxy."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DIFFMEM_CACHE", raising=False)
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


# -- a real HTTP server on 127.0.0.1 ----------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass

    def _send(self, status: int, content_type: str | None, body: bytes, length: bool = True) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - BaseHTTPRequestHandler's naming
        path = self.path
        with self.server.lock:
            self.server.requests[path] += 1
        stop = self.server.stop
        if path == "/cat.png":
            self._send(200, "image/png", CAT)
        elif path == "/photo":
            self._send(200, "image/jpeg; charset=binary", jpeg_bytes())
        elif path == "/page.html":
            self._send(200, "text/html; charset=utf-8", b"<html><body>a cat</body></html>")
        elif path == "/untyped":
            self._send(200, None, CAT)
        elif path == "/fake.png":
            self._send(200, "image/png", b"this is not a png at all")
        elif path == "/big.png":
            self._send(200, "image/png", NOISE)
        elif path == "/big-unsized.png":
            self._send(200, "image/png", NOISE, length=False)  # HTTP/1.0: the body ends when the socket closes
        elif path == "/endless.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            chunk = b"\0" * 65536
            for _ in range(1600):  # up to 100 MiB, unless the client hangs up first
                if stop.is_set():
                    break
                self.wfile.write(chunk)
        elif path == "/slow-headers.png":
            stop.wait(STALL)
            self._send(200, "image/png", CAT)
        elif path == "/slow-body.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(CAT)))
            self.end_headers()
            self.wfile.write(CAT[:10])
            self.wfile.flush()
            stop.wait(STALL)
            self.wfile.write(CAT[10:])
        elif path == "/trickle.png":  # a byte every 50 ms: each read is quick, the whole body never ends
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            while not stop.wait(0.05):
                self.wfile.write(b"\0")
                self.wfile.flush()
        elif path == "/to-cat":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/cat.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404, "Not Found")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: Counter = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def handle_error(self, request, client_address):
        pass  # a client that hung up on purpose (timeouts, size limits) is not an error here

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.stop.set()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# -- downloads ----------------------------------------------------------------------------------------------


def test_png_downloaded_once_then_from_cache(server, cache):
    url = server.url("/cat.png")
    first = load_reference(url, cache=cache)
    assert first.dtype == np.uint8 and first.shape == (8, 8, 3) and tuple(first[0, 0]) == (200, 30, 30)
    second = load_reference(url, (4, 6), cache=cache)
    assert second.shape == (4, 6, 3)
    assert server.requests["/cat.png"] == 1
    digest = hashlib.sha256(url.encode()).hexdigest()
    assert sorted(p.name for p in cache.iterdir()) == [f"{digest}.png"]  # no temp file left behind
    assert (cache / f"{digest}.png").read_bytes() == CAT


def test_suffix_follows_the_image_format_and_redirects_are_followed(server, cache):
    path = download_reference(server.url("/photo"), cache=cache)
    assert path.suffix == ".jpg" and path.parent == cache
    path = download_reference(server.url("/to-cat"), cache=cache)
    assert path.suffix == ".png" and server.requests["/cat.png"] == 1


@pytest.mark.parametrize(
    "route,reason",
    [
        ("/missing.png", "HTTP 404 Not Found"),
        ("/page.html", "is not an image (content type 'text/html; charset=utf-8')"),
        ("/untyped", "is not an image (content type None)"),
        ("/fake.png", "is not an image (the body does not decode"),
        ("/to-ftp", "redirect to a non-http(s) URL"),
    ],
)
def test_download_failures_are_one_line_and_leave_no_file(server, cache, route, reason):
    url = server.url(route)
    message = one_line_error(load_reference, url, row="refs.jsonl:7", cache=cache)
    assert message.startswith(f"refs.jsonl:7: reference '{url}' ") and reason in message
    assert not cache.exists()


@pytest.mark.parametrize("route", ["/big.png", "/big-unsized.png"])
def test_too_large(server, cache, route):
    message = one_line_error(download_reference, server.url(route), cache=cache, max_bytes=len(NOISE) - 1)
    assert "is too large" in message and str(len(NOISE) - 1) in message
    assert not cache.exists()
    assert download_reference(server.url(route), cache=cache, max_bytes=len(NOISE)).read_bytes() == NOISE


def test_reading_stops_past_the_limit(server, cache):
    start = time.monotonic()
    message = one_line_error(download_reference, server.url("/endless.png"), cache=cache, max_bytes=100_000)
    assert "more than 100000 bytes" in message
    assert time.monotonic() - start < 2.0  # it did not read the 100 MiB the server offers
    assert not cache.exists()


@pytest.mark.parametrize("route", ["/slow-headers.png", "/slow-body.png"])
def test_slow_server_times_out(server, cache, route):
    start = time.monotonic()
    message = one_line_error(load_reference, server.url(route), row="m.jsonl:3", cache=cache, timeout=SHORT)
    assert message.startswith("m.jsonl:3: ") and "timed out" in message and f"{SHORT:g} s" in message
    assert time.monotonic() - start < SHORT + 1.5
    assert not cache.exists()


def test_trickling_server_hits_the_total_timeout(server, cache):
    start = time.monotonic()
    message = one_line_error(download_reference, server.url("/trickle.png"), cache=cache, timeout=SHORT,
                             total_timeout=0.4)
    assert "timed out (download took over 0.4 s)" in message
    assert time.monotonic() - start < 0.4 + SHORT + 1.0
    assert not cache.exists()


def test_connection_refused_names_the_reason(cache):
    # a port that was just free: nothing listens there
    srv = _Server()
    port = srv.server_address[1]
    srv.server_close()
    message = one_line_error(download_reference, f"http://127.0.0.1:{port}/x.png", cache=cache, timeout=SHORT)
    assert "could not be downloaded" in message


def test_bad_limits_are_value_errors(cache):
    with pytest.raises(ValueError, match="timeout"):
        load_reference("x.png", timeout=0)
    with pytest.raises(ValueError, match="max_bytes"):
        fetch_references([], max_bytes=0)


# -- where the cache lives ----------------------------------------------------------------------------------


def test_cache_folder_default_env_and_argument(server, tmp_path, monkeypatch):
    home = tmp_path / "home"
    assert default_cache_dir() == home / ".cache" / "diffmem"
    env_cache = tmp_path / "env-cache"
    monkeypatch.setenv("DIFFMEM_CACHE", str(env_cache))
    assert default_cache_dir() == env_cache
    assert not env_cache.exists()  # asking does not create it
    path = download_reference(server.url("/cat.png"))
    assert path.parent == env_cache
    arg_cache = tmp_path / "arg" / "cache"
    path = download_reference(server.url("/photo"), cache=arg_cache)
    assert path.parent == arg_cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arg", "env-cache"]  # nothing else, no ~/.cache
    assert len(list(env_cache.iterdir())) == 1 and len(list(arg_cache.iterdir())) == 1


def test_local_references_do_not_create_a_cache(tmp_path, cache):
    ref = tmp_path / "a.png"
    ref.write_bytes(CAT)
    assert load_reference(ref, cache=cache).shape == (8, 8, 3)
    assert not cache.exists() and not (tmp_path / "home").exists()


# -- the batch helper ---------------------------------------------------------------------------------------


def test_fetch_references_skip_missing(server, cache, tmp_path, caplog):
    good_local = tmp_path / "ok.png"
    good_local.write_bytes(CAT)
    (tmp_path / "broken.png").write_text("not an image")
    lines = [
        {"prompt": "cat from the web", "url": server.url("/cat.png")},
        {"prompt": "gone", "url": server.url("/missing.png")},
        {"prompt": "no picture"},
        {"prompt": "gone again", "url": server.url("/missing.png")},
        {"prompt": "a web page", "url": server.url("/page.html")},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    entries = read_entries(prompts)
    entries.append(ManifestEntry("local", True, 1, "locate", good_local))
    entries.append(ManifestEntry("local broken", True, 1, "locate", tmp_path / "broken.png"))
    with caplog.at_level(logging.WARNING, logger="diffmem.data"):
        ok, failures = fetch_references(entries, skip_missing=True, cache=cache)
    assert [e.prompt for e in ok] == ["cat from the web", "no picture", "local"]
    assert [(f.row, f.prompt) for f in failures] == [
        (f"{prompts}:2", "gone"),
        (f"{prompts}:4", "gone again"),
        (f"{prompts}:5", "a web page"),
        ("prompt 'local broken'", "local broken"),
    ]
    assert "HTTP 404" in failures[0].reason and "content type" in failures[2].reason
    assert "is not an image" in failures[3].reason
    assert json.dumps([f.to_dict() for f in failures])
    assert server.requests["/missing.png"] == 1  # one request for a URL that two rows share
    per_row = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(per_row) == 4 and all("\n" not in m for m in per_row)
    assert per_row[0].startswith(f"{prompts}:2: reference ")
    # the URLs that worked load from the cache without a new request
    assert load_reference(ok[0], cache=cache).shape == (8, 8, 3)
    assert server.requests["/cat.png"] == 1


def test_fetch_references_raises_the_first_failure(server, cache, tmp_path):
    entries = [
        ManifestEntry("fine", False, 0, "nonmem", server.url("/cat.png")),
        ManifestEntry("broken", False, 0, "nonmem", server.url("/fake.png")),
        ManifestEntry("never asked", False, 0, "nonmem", server.url("/missing.png")),
    ]
    message = one_line_error(fetch_references, entries, cache=cache)
    assert message.startswith("prompt 'broken': reference ") and "does not decode" in message
    assert server.requests["/missing.png"] == 0


# -- local references: containment and errors that name the row ---------------------------------------------


@pytest.fixture
def layout(tmp_path):
    """``data/manifest.jsonl`` with ``data/train/0.png`` inside and ``secret.png`` outside the manifest folder."""
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "0.png").write_bytes(CAT)
    (tmp_path / "secret.png").write_bytes(png_bytes((1, 2, 3)))
    return data


def write_manifest_lines(folder: Path, references: list) -> Path:
    path = folder / "manifest.jsonl"
    rows = [{"prompt": f"p{i}", "memorized": True, "duplicates": 2, "split": "locate", "reference": r}
            for i, r in enumerate(references)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("escape", ["../secret.png", "train/../../secret.png", "ABSOLUTE"])
def test_manifest_reference_outside_its_folder_is_refused(layout, escape):
    outside = (layout.parent / "secret.png").resolve()
    ref = str(outside) if escape == "ABSOLUTE" else escape
    path = write_manifest_lines(layout, ["train/0.png", ref])
    message = one_line_error(read_manifest, path)
    assert message.startswith(f"{path}:2: reference {ref!r} lies outside the folder {layout.resolve()}")
    assert "allow_outside" in message
    entries = read_manifest(path, allow_outside=True)
    assert entries[1].reference == outside
    assert tuple(load_reference(entries[1], allow_outside=True)[0, 0]) == (1, 2, 3)
    # the check is made again where the image is loaded
    message = one_line_error(load_reference, entries[1])
    assert message.startswith(f"{path}:2: reference ") and "lies outside" in message
    message = one_line_error(load_reference, entries[1].reference, row=entries[1])
    assert "lies outside" in message


def test_etc_passwd_is_refused_without_probing_it(layout):
    path = write_manifest_lines(layout, ["../../../../../../../../etc/passwd"])
    message = one_line_error(read_entries, path)
    assert message.startswith(f"{path}:1: reference '../../../../../../../../etc/passwd' lies outside the folder")
    # allowed, it is still not an image: a one-line error, not a PIL traceback
    entries = read_entries(path, allow_outside=True) if Path("/etc/passwd").is_file() else None
    if entries is not None:
        message = one_line_error(load_reference, entries[0], allow_outside=True)
        assert message.startswith(f"{path}:1: ") and "is not an image" in message


def test_symlink_out_of_the_folder_is_refused(layout):
    link = layout / "train" / "link.png"
    try:
        link.symlink_to(layout.parent / "secret.png")
    except OSError:
        pytest.skip("this file system cannot make symlinks")
    path = write_manifest_lines(layout, ["train/link.png"])
    assert "lies outside" in one_line_error(read_manifest, path)
    assert read_manifest(path, allow_outside=True)[0].reference == (layout.parent / "secret.png").resolve()


def test_entries_built_in_code_are_checked_against_their_folder(layout):
    entry = ManifestEntry("x", True, 1, "locate", "../secret.png", folder=layout)
    assert "lies outside" in one_line_error(load_reference, entry)
    assert load_reference(entry, allow_outside=True).shape == (8, 8, 3)
    inside = replace(entry, reference="train/0.png")
    assert load_reference(inside).shape == (8, 8, 3)


def test_missing_reference_names_its_row(layout):
    path = write_manifest_lines(layout, ["train/0.png"])
    entry = read_manifest(path)[0]
    (layout / "train" / "0.png").unlink()
    message = one_line_error(load_reference, entry, (4, 4))
    assert message.startswith(f"{path}:1: reference ") and "does not exist" in message
    bare = ManifestEntry("a lonely lighthouse at dusk", True, 1, "locate", layout / "nope.png")
    message = one_line_error(load_reference, bare)
    assert message.startswith("prompt 'a lonely lighthouse at dusk': reference ") and "does not exist" in message
    message = one_line_error(load_reference, ManifestEntry("no ref", False, 0, "nonmem"))
    assert message == "prompt 'no ref': has no reference image"


def test_reference_that_is_not_an_image_names_its_row(layout):
    (layout / "train" / "0.png").write_text("<html>not a png</html>")
    path = write_manifest_lines(layout, ["train/0.png"])
    entry = read_manifest(path)[0]
    message = one_line_error(load_reference, entry)
    assert message.startswith(f"{path}:1: reference ") and "is not an image" in message
    (layout / "train" / "0.png").write_bytes(NOISE[: len(NOISE) // 2])  # a truncated PNG
    message = one_line_error(load_reference, entry)
    assert message.startswith(f"{path}:1: reference ") and "cannot be read as an image" in message


def test_load_reference_resizes_and_converts(tmp_path):
    rgba = tmp_path / "a.png"
    Image.fromarray(np.full((6, 10, 4), 77, np.uint8)).save(rgba)
    img = load_reference(rgba)
    assert img.shape == (6, 10, 3) and img.dtype == np.uint8
    assert load_reference(str(rgba), (3, 5)).shape == (3, 5, 3)


def test_other_url_schemes_are_refused(layout):
    path = write_manifest_lines(layout, ["file:///etc/passwd"])
    assert "is not an http(s) URL or a local path" in one_line_error(read_manifest, path)
    message = one_line_error(load_reference, "ftp://127.0.0.1/a.png", row="x.csv:4")
    assert message.startswith("x.csv:4: reference 'ftp://127.0.0.1/a.png' ")


def test_url_references_round_trip_through_a_manifest(layout):
    url = "https://example.invalid/a.png"  # never requested
    entries = [ManifestEntry("web", True, 3, "locate", url), ManifestEntry("local", True, 3, "heldout",
                                                                           layout / "train" / "0.png")]
    path = write_manifest(entries, layout / "m.jsonl")
    assert json.loads(path.read_text().splitlines()[0])["reference"] == url
    again = read_entries(path)
    assert again == [entries[0], replace(entries[1], reference=(layout / "train" / "0.png").resolve())]
    assert again[0].row == f"{path}:1" and again[0].folder == layout.resolve()


# -- resolve_references -------------------------------------------------------------------------------------


def test_resolve_references_from_a_folder(layout, tmp_path):
    refs = tmp_path / "refs"
    (refs / "img").mkdir(parents=True)
    (refs / "img" / "a.png").write_bytes(CAT)
    (refs / "references.jsonl").write_text(
        json.dumps({"prompt": "p0", "reference": "img/a.png"}) + "\n\n"
        + json.dumps({"prompt": "p1", "reference": "https://example.invalid/b.jpg"}) + "\n"
    )
    entries = read_manifest(write_manifest_lines(layout, [None, "train/0.png", None]))
    got = resolve_references(refs, entries)
    assert got == [str((refs / "img" / "a.png").resolve()), "https://example.invalid/b.jpg", None]
    assert resolve_references(None, entries) == [None, str((layout / "train" / "0.png").resolve()), None]
    # a reference found elsewhere loads with its row named for messages
    assert load_reference(got[0], row=entries[0]).shape == (8, 8, 3)


@pytest.mark.parametrize(
    "line,problem",
    [
        ("{oops", "bad JSON"),
        ('["p0", "img/a.png"]', "expected a JSON object"),
        ('{"prompt": "p0"}', "missing field 'reference'"),
        ('{"prompt": "p0", "reference": "img/none.png"}', "does not exist"),
        ('{"prompt": "p0", "reference": "../../secret.png"}', "lies outside"),
        ('{"prompt": "p0", "reference": 3}', "must be a path or http(s) URL string"),
        ('{"prompt": "p1", "reference": "img/a.png"}', "already has another reference on line 1"),
    ],
)
def test_references_jsonl_errors_name_file_and_line(tmp_path, line, problem):
    refs = tmp_path / "refs"
    (refs / "img").mkdir(parents=True)
    (refs / "img" / "a.png").write_bytes(CAT)
    (tmp_path / "secret.png").write_bytes(CAT)
    index = refs / "references.jsonl"
    index.write_text(json.dumps({"prompt": "p1", "reference": None}) + "\n" + line + "\n")
    message = one_line_error(resolve_references, refs, [ManifestEntry("p0", True, 1, "locate")])
    assert message.startswith(f"{index}:2: ") and problem in message


def test_resolve_references_from_another_file(layout, tmp_path):
    entries = read_entries(write_manifest_lines(layout, [None, "train/0.png"]))
    other = tmp_path / "web.csv"
    other.write_text("caption;URL;type\np0;https://example.invalid/0.jpg;VM\np1;;TM\n")
    assert resolve_references(other, entries) == ["https://example.invalid/0.jpg",
                                                   str((layout / "train" / "0.png").resolve())]
    assert "no such file or folder" in one_line_error(resolve_references, tmp_path / "nope", entries)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "needs a references.jsonl" in one_line_error(resolve_references, empty, entries)
