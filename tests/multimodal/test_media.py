"""Reading images within limits: SSRF refusal by address class, redirects re-checked and counted, size limits while
streaming, local paths confined to the allowed folder (links resolved), decoding checks before the pixels are read."""

from __future__ import annotations

import base64
import http.server
import os
import threading

import pytest

from runtime.multimodal.inputs import pad_ids
from runtime.multimodal.media import MediaError, MediaLimits, check_public, decode_image, load_image, read_bytes
from tests.multimodal_fixtures import png_bytes, random_image

PNG = png_bytes(random_image(0))


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.5.5", "169.254.169.254",
                                     "::1", "fd00:ec2::254", "::ffff:127.0.0.1", "0.0.0.0", "224.0.0.1", "fe80::1"])
def test_non_public_addresses_are_refused(address):
    with pytest.raises(MediaError, match="non-public"):
        check_public(address, "f")


def test_public_addresses_pass():
    check_public("93.184.216.34", "f")
    check_public("2606:2800:220:1:248:1893:25c7:1946", "f")


@pytest.fixture(scope="module")
def http_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/hop"):
                hops = int(self.path[4:])
                self.send_response(302)
                self.send_header("Location", f"/hop{hops - 1}" if hops > 1 else "/cat.png")
                self.end_headers()
                return
            body = PNG if self.path == "/cat.png" else b"x" * 5000
            self.send_response(200)
            self.end_headers()  # no Content-Length: the size limit applies while reading
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fetch_follows_redirects_up_to_the_limit(http_server):
    limits = MediaLimits(allow_private_networks=True, max_redirects=2)
    assert read_bytes(http_server + "/hop2", "f", limits) == PNG
    with pytest.raises(MediaError, match="more than 2 redirects"):
        read_bytes(http_server + "/hop3", "f", limits)
    with pytest.raises(MediaError, match="non-public"):  # the default: the loopback is refused
        read_bytes(http_server + "/cat.png", "f", MediaLimits())
    with pytest.raises(MediaError, match="larger than 4000 bytes"):
        read_bytes(http_server + "/big", "f", MediaLimits(allow_private_networks=True, max_bytes=4000))


def test_local_paths_stay_in_the_allowed_folder(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    os.symlink(tmp_path / "secret.png", allowed / "link.png")
    limits = MediaLimits(allowed_local_path=str(allowed))
    assert load_image(f"file://{allowed}/cat.png", "f", limits).size == (40, 32)
    for escape in (f"{allowed}/../secret.png", f"{allowed}/link.png"):
        with pytest.raises(MediaError, match="outside --allowed-local-media-path"):
            read_bytes(escape, "f", limits)
    with pytest.raises(MediaError, match="local files are not allowed"):
        read_bytes(f"{allowed}/cat.png", "f", MediaLimits())


def test_decoding_limits_and_detail():
    with pytest.raises(MediaError, match="40x32 pixels; the limit is 1000"):
        decode_image(PNG, "f", MediaLimits(max_pixels=1000))
    with pytest.raises(MediaError, match="not a readable image"):
        decode_image(PNG[:40], "f", MediaLimits())
    big = "data:image/png;base64," + base64.b64encode(png_bytes(random_image(1, 1024, 600))).decode()
    assert load_image(big, "f", MediaLimits(), detail="low").size == (512, 300)
    assert load_image(base64.b64encode(PNG).decode(), "f", MediaLimits()).mode == "RGB"  # SGLang's bare base64


def test_pad_ids_depend_on_the_pixels_only():
    import numpy as np

    a = {"pixel_values": np.zeros((1, 3, 4, 4), dtype=np.float32)}
    b = {"pixel_values": np.ones((1, 3, 4, 4), dtype=np.float32)}
    assert pad_ids(a, 20) == pad_ids({"pixel_values": a["pixel_values"].copy()}, 20)
    assert pad_ids(a, 20) != pad_ids(b, 20)
    assert min(pad_ids(a, 20)) >= 1 << 30 and len(set(pad_ids(a, 20))) == 8  # 8 words of the 256-bit hash
