"""The ingress loads each vision checkpoint's processor in a process where `import torch` is blocked: the image
processor must be the PIL one (transformers 5.17, on the GPU image, gates AutoImageProcessor on torchvision, which
cannot import there; the first GPU run of the vision benchmark failed on it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.kernel_fixtures import REPO
from tests.multimodal_fixtures import save_tiny_llava, save_tiny_qwen2_vl

PROBE = """
import sys
from actors.boot import block_imports
block_imports(["torch"])
from runtime.multimodal.processor import load_processor
print(type(load_processor(sys.argv[1]).image_processor).__name__)
"""


@pytest.mark.parametrize("kind", ["llava", "llava_onevision", "qwen2_vl"])
def test_processor_loads_without_torch_with_the_pil_image_processor(kind, tmp_path):
    if kind == "qwen2_vl":
        save_tiny_qwen2_vl(str(tmp_path))
    else:
        save_tiny_llava(str(tmp_path), kind)
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].endswith("Pil")
