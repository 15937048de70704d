"""Reading an image a request names, into a decoded RGB PIL image, within limits; every refusal a MediaError that
names the request field.

Sources (one string each, as OpenAI's image_url.url and SGLang's image_data take them):
- `data:image/<type>;base64,<data>`, or bare base64 (SGLang's image_data);
- `http://` / `https://` URLs, fetched with a time limit, a size limit and a redirect limit. The host's addresses are
  resolved first and every one must be public: loopback, private, link-local (cloud metadata, 169.254.169.254),
  multicast, reserved and unspecified addresses are refused (SSRF), after each redirect too, and the connection goes
  to the address that was checked (no second lookup a DNS rebinding could answer differently);
- local paths (`file://` URLs or absolute paths): only under `--allowed-local-media-path`, after resolving links.
Decoding checks the format (PNG, JPEG, WebP, GIF, BMP, TIFF) and the pixel count before the pixels are read.
Fetching and decoding block: the ingress runs them on its media threads, never on its event loop.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass

from PIL import Image

FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
USER_AGENT = "runtime-media-fetch/1"


@dataclass(frozen=True)
class ImageRef:
    """An image a request names: the source string, the request field it came from, OpenAI's `detail`."""

    source: object
    field: str
    detail: str = "auto"


class MediaError(ValueError):
    """A request's image cannot be used: `field` names it (messages[0].content[1].image_url, image_data[2], ...)."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status


@dataclass(frozen=True)
class MediaLimits:
    fetch_timeout_s: float = 10.0  # the whole fetch, redirects included
    max_bytes: int = 20 << 20  # encoded size
    max_redirects: int = 3
    max_pixels: int = 40_000_000  # width x height, checked before decoding
    allowed_local_path: str | None = None  # None: no local files
    allow_private_networks: bool = False  # fetch from loopback/private addresses too (closed networks, tests)

    @classmethod
    def from_args(cls, args) -> MediaLimits:
        return cls(args.media_fetch_timeout, args.media_max_bytes, args.media_max_redirects, args.media_max_pixels,
                   args.allowed_local_media_path, args.media_allow_private_networks)


def load_image(source, field: str, limits: MediaLimits, detail: str = "auto") -> Image.Image:
    """The image `source` names, decoded to RGB. detail "low" scales it down to at most 512 pixels a side first."""
    if not isinstance(source, str) or not source:
        raise MediaError(field, "expected a non-empty string (a data URL, base64, an http(s) URL or a file path)")
    image = decode_image(read_bytes(source, field, limits), field, limits)
    if detail == "low" and max(image.size) > 512:
        image.thumbnail((512, 512))
    return image


def read_bytes(source: str, field: str, limits: MediaLimits) -> bytes:
    if source.startswith("data:"):
        header, _, data = source.partition(",")
        if not header.endswith(";base64"):
            raise MediaError(field, "a data URL must be base64 (data:image/<type>;base64,...)")
        if not header[5:].startswith("image/"):
            raise MediaError(field, f"the data URL holds {header[5:-7] or 'no media type'}, not an image")
        return _b64decode(data, field, limits)
    if source.startswith(("http://", "https://")):
        return fetch(source, field, limits)
    if source.startswith("file://") or os.path.isabs(source):
        return read_local(urllib.parse.unquote(source.removeprefix("file://")), field, limits)
    if len(source) > 64 or "/" in source or "+" in source or "=" in source:  # plausible base64 (SGLang's image_data)
        return _b64decode(source, field, limits)
    raise MediaError(field, "not a data URL, base64, an http(s) URL or an absolute file path")


def _b64decode(data: str, field: str, limits: MediaLimits) -> bytes:
    if len(data) * 3 // 4 > limits.max_bytes:
        raise MediaError(field, f"the image is larger than {limits.max_bytes} bytes (--media-max-bytes)")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(field, "invalid base64") from None


def read_local(path: str, field: str, limits: MediaLimits) -> bytes:
    if limits.allowed_local_path is None:
        raise MediaError(field, "local files are not allowed (start the server with --allowed-local-media-path)")
    root = os.path.realpath(limits.allowed_local_path)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise MediaError(field, f"{path} is outside --allowed-local-media-path")
    try:
        size = os.path.getsize(real)
        if size > limits.max_bytes:
            raise MediaError(field, f"the file has {size} bytes; the limit is {limits.max_bytes} (--media-max-bytes)")
        with open(real, "rb") as f:
            return f.read()
    except OSError as err:
        raise MediaError(field, f"cannot read {path}: {err.strerror}") from None


def check_public(address: str, field: str) -> None:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified):
        raise MediaError(field, f"the URL's host resolves to {address}, a non-public address: refused")


def fetch(url: str, field: str, limits: MediaLimits) -> bytes:
    deadline = time.monotonic() + limits.fetch_timeout_s
    for _ in range(limits.max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MediaError(field, f"cannot fetch {url!r}: only http and https URLs with a host are fetched")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = _resolve(parts.hostname, port, field, limits)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MediaError(field, f"fetching the image took longer than {limits.fetch_timeout_s} s")
        conn = _PinnedConnection(parts.scheme, parts.hostname, port, address, remaining)
        try:
            path = parts.path or "/"
            conn.request("GET", path + (f"?{parts.query}" if parts.query else ""),
                         headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise MediaError(field, f"the server answered {response.status} without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            if response.status != 200:
                raise MediaError(field, f"fetching {url} answered HTTP {response.status}")
            length = response.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > limits.max_bytes:
                raise MediaError(field, f"the image has {length} bytes; the limit is {limits.max_bytes} "
                                        f"(--media-max-bytes)")
            chunks, total = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise MediaError(field, f"fetching the image took longer than {limits.fetch_timeout_s} s")
                chunk = response.read(65536)
                if not chunk:
                    return b"".join(chunks)
                total += len(chunk)
                if total > limits.max_bytes:
                    raise MediaError(field, f"the image is larger than {limits.max_bytes} bytes (--media-max-bytes)")
                chunks.append(chunk)
        except (OSError, http.client.HTTPException) as err:
            if isinstance(err, TimeoutError | socket.timeout):
                raise MediaError(field, f"fetching the image took longer than {limits.fetch_timeout_s} s") from None
            raise MediaError(field, f"cannot fetch {url}: {err}") from None
        finally:
            conn.close()
    raise MediaError(field, f"more than {limits.max_redirects} redirects (--media-max-redirects)")


def _resolve(host: str, port: int, field: str, limits: MediaLimits) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise MediaError(field, f"cannot resolve {host}: {err.strerror}") from None
    addresses = [info[4][0] for info in infos]
    if not limits.allow_private_networks:
        for address in addresses:
            check_public(address, field)
    return addresses[0]


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to `address` (already checked), with `host` in the Host header and as the TLS server name."""

    def __init__(self, scheme: str, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.scheme = scheme
        self.address = address

    def connect(self):
        sock = socket.create_connection((self.address, self.port), self.timeout)
        if self.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self.sock = sock


def decode_image(data: bytes, field: str, limits: MediaLimits) -> Image.Image:
    if len(data) > limits.max_bytes:
        raise MediaError(field, f"the image has {len(data)} bytes; the limit is {limits.max_bytes} (--media-max-bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise MediaError(field, f"the image has more than {limits.max_pixels} pixels (--media-max-pixels)") from None
    except (OSError, ValueError):
        raise MediaError(field, "not a readable image (corrupt, or not PNG, JPEG, WebP, GIF, BMP or TIFF)") from None
    if image.format not in FORMATS:
        raise MediaError(field, f"unsupported image format {image.format} (PNG, JPEG, WebP, GIF, BMP, TIFF)")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise MediaError(field, f"the image has {width}x{height} pixels; the limit is {limits.max_pixels} "
                                f"(--media-max-pixels)")
    try:
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        raise MediaError(field, "the image data is corrupt") from None
