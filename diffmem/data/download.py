"""The download cache of reference images.

A URL is downloaded once into a cache folder (``~/.cache/diffmem``, or ``$DIFFMEM_CACHE``, or the ``cache``
argument) under the sha256 of the URL, with limits on size and time, only when the server says ``image/*`` and the
body decodes as an image, and only through redirects to other ``http(s)`` URLs.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import ConfigError, PromptFileError
from .manifest import _URL_SCHEMES, ManifestEntry, _ReferenceProblem, _url_scheme, is_url
from .prompts import _one_line

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TOTAL_TIMEOUT",
    "default_cache_dir",
    "download_reference",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
"""Largest reference download kept (20 MiB); reading stops as soon as a body grows past it."""

DEFAULT_TIMEOUT = 20.0
"""Seconds allowed for connecting and for each read of a reference download."""

DEFAULT_TOTAL_TIMEOUT = 120.0
"""Seconds allowed for a whole reference download, so that a server trickling bytes cannot stall a run."""

_CHUNK_BYTES = 64 * 1024
_CACHE_ENV = "DIFFMEM_CACHE"
_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


def default_cache_dir() -> Path:
    """The folder reference downloads are cached in when no ``cache`` argument is given.

    Returns:
        ``$DIFFMEM_CACHE`` when set, else ``~/.cache/diffmem``. Nothing is created here.
    """
    env = os.environ.get(_CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffmem"


def _cache_dir(cache: str | os.PathLike[str] | None) -> Path:
    return Path(cache).expanduser() if cache is not None else default_cache_dir()


def _cached_file(url: str, folder: Path) -> Path | None:
    """The cached download of ``url`` in ``folder``, if any (``<sha256 of the url><suffix>``)."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
    if not folder.is_dir():
        return None
    return next((p for p in sorted(folder.glob(f"{digest}.*")) if p.is_file()), None)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) URLs only (urllib would also follow one to ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 - urllib's signature
        if _url_scheme(newurl) not in _URL_SCHEMES:
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL {newurl!r}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_body(url: str, timeout: float, max_bytes: int, total_timeout: float | None) -> bytes:
    """GET ``url`` within the limits; the body of an ``image/*`` response, or a :class:`_ReferenceProblem`."""
    request = urllib.request.Request(url, headers={"User-Agent": "diffmem", "Accept": "image/*"})
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    start = time.monotonic()
    timed_out = f"timed out (limit {timeout:g} s to connect and for each read)"
    try:
        with opener.open(request, timeout=timeout) as response:
            content_type = response.headers.get("Content-Type")
            if not content_type or not response.headers.get_content_type().startswith("image/"):
                raise _ReferenceProblem(f"is not an image (content type {content_type!r})")
            length = response.headers.get("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > max_bytes:
                raise _ReferenceProblem(f"is too large ({int(length)} bytes; the limit is {max_bytes})")
            chunks, size = [], 0
            while True:
                chunk = response.read1(_CHUNK_BYTES)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise _ReferenceProblem(f"is too large (more than {max_bytes} bytes)")
                if total_timeout is not None and time.monotonic() - start > total_timeout:
                    raise _ReferenceProblem(f"timed out (download took over {total_timeout:g} s)")
                chunks.append(chunk)
    except urllib.error.HTTPError as err:
        err.close()
        raise _ReferenceProblem(f"could not be downloaded: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            raise _ReferenceProblem(timed_out) from None
        raise _ReferenceProblem(f"could not be downloaded ({err.reason})") from None
    except TimeoutError:
        raise _ReferenceProblem(timed_out) from None
    except (http.client.HTTPException, OSError, ValueError) as err:
        raise _ReferenceProblem(f"could not be downloaded ({type(err).__name__}: {err})") from None
    return b"".join(chunks)


def _image_suffix(body: bytes) -> str:
    """The file suffix of an image body after PIL has verified it, or a :class:`_ReferenceProblem`."""
    try:
        with Image.open(io.BytesIO(body)) as img:
            fmt = img.format
            img.verify()
    except Exception as err:  # noqa: BLE001 - PIL raises many types on untrusted bytes; all mean "not an image"
        raise _ReferenceProblem(f"is not an image (the body does not decode: {type(err).__name__}: {err})") from None
    if fmt in _SUFFIXES:
        return _SUFFIXES[fmt]
    by_format = {f: ext for ext, f in Image.registered_extensions().items()}
    return by_format.get(fmt or "", ".img")


def _store(folder: Path, name: str, body: bytes) -> Path:
    """Write ``body`` to ``folder / name`` atomically (temp file in ``folder``, fsync, os.replace)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    except OSError as err:
        raise _ReferenceProblem(f"could not be cached in {folder} ({err})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / name)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _ReferenceProblem(f"could not be cached in {folder} ({err})") from None
        raise
    return folder / name


def _download(
    url: str, cache: str | os.PathLike[str] | None, timeout: float, max_bytes: int, total_timeout: float | None
) -> Path:
    """The cached file of ``url``, downloading it first when it is not in the cache."""
    folder = _cache_dir(cache)
    hit = _cached_file(url, folder)
    if hit is not None:
        logger.debug("reference %s from the cache (%s)", url, hit)
        return hit
    body = _fetch_body(url, timeout, max_bytes, total_timeout)
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
    path = _store(folder, digest + _image_suffix(body), body)
    logger.info("downloaded %s (%d bytes) to %s", url, len(body), path)
    return path


def _check_limits(timeout: float, max_bytes: int, total_timeout: float | None) -> None:
    if not timeout > 0:
        raise ConfigError(f"timeout={timeout!r} is invalid: must be > 0 seconds")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ConfigError(f"max_bytes={max_bytes!r} is invalid: must be an integer >= 1")
    if total_timeout is not None and not total_timeout > 0:
        raise ConfigError(f"total_timeout={total_timeout!r} is invalid: must be > 0 seconds or None")


def _row_label(row: ManifestEntry | str | None) -> str | None:
    if isinstance(row, ManifestEntry):
        return row.row
    return None if row is None else _one_line(str(row))


def _message(row: ManifestEntry | str | None, ref: Any, reason: str) -> str:
    label = _row_label(row)
    text = f"reference {_one_line(str(ref))!r} {reason}"
    return text if label is None else f"{label}: {text}"


def download_reference(
    url: str,
    *,
    row: ManifestEntry | str | None = None,
    cache: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    total_timeout: float | None = DEFAULT_TOTAL_TIMEOUT,
) -> Path:
    """Download a reference image once into the cache and return the cached file.

    The file is named after the sha256 of the URL plus the suffix of the image format, and written atomically
    (temp file in the cache folder, fsync, ``os.replace``) only after the server answered ``image/*``, the body
    stayed within ``max_bytes`` and PIL verified it. Nothing outside the cache folder is written; the folder is
    created only when a download is stored. A URL already cached is not requested again.

    Args:
        url: An ``http(s)`` URL.
        row: The manifest entry (or a label) that names the URL, for messages.
        cache: The cache folder; default :func:`default_cache_dir` (``$DIFFMEM_CACHE`` or ``~/.cache/diffmem``).
        timeout: Seconds allowed to connect and for each read.
        max_bytes: Largest body accepted; reading stops as soon as the body grows past it.
        total_timeout: Seconds allowed for the whole download, or ``None`` for no overall limit.

    Returns:
        The path of the cached image.

    Raises:
        PromptFileError: One line naming the row and the reason (HTTP status, not an image, too large, timed out).
    """
    _check_limits(timeout, max_bytes, total_timeout)
    if not is_url(url):
        raise PromptFileError(_message(row, url, "is not an http(s) URL"))
    try:
        return _download(url.strip(), cache, timeout, max_bytes, total_timeout)
    except _ReferenceProblem as err:
        raise PromptFileError(_message(row, url, err.reason)) from None
