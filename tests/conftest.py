import logging
import os

import pytest
import torch

from solution.model import ModelConfig, build_model

torch.set_num_threads(1)  # tiny models: one thread is faster and leaves a core for DataLoader/subprocesses


@pytest.fixture
def tiny_config():
    return ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=32)


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return build_model(tiny_config)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(mib)`` mounts a tmpfs of that size under ``tmp_path`` (unmounted afterwards).

    Fills a disk without filling the machine's; needs root, skipped with the reason elsewhere.
    """
    import shutil
    import subprocess
    import uuid

    mounted = []

    def mount(mib: int):
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a tmpfs needs root")
        d = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        d.mkdir()
        try:
            r = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={mib}M", "tmpfs", str(d)],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot mount a tmpfs here: {e}")
        if r.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.strip() or r.returncode}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)
