"""The device list comes from a child process (torch never enters the caller) and is cached per Python."""
from __future__ import annotations

import json
import sys
import time

from IDEALSegmentLib.devices import DeviceProbe
from IDEALSegmentLib.jobs import python_executable


def test_probe_runs_in_a_child_and_caches_its_answer(tmp_path):
    cache = tmp_path / "cache" / "devices.json"
    probe = DeviceProbe(cache)
    assert probe.cached() is None and probe.poll() is None
    torch_before = "torch" in sys.modules
    probe.start()
    deadline = time.monotonic() + 60
    devices = None
    while devices is None and time.monotonic() < deadline:
        devices = probe.poll()
        time.sleep(0.05)
    assert devices == []  # this machine's torch is a CPU build
    assert ("torch" in sys.modules) == torch_before  # the probe did not import torch here
    assert probe.cached() == [] and DeviceProbe(cache).cached() == []
    cache.write_text(json.dumps({"python": "/another/python", "devices": [["cuda:0", "GPU"]]}))
    assert probe.cached() is None  # another Python's answer is not this one's
    cache.write_text(json.dumps({"python": str(python_executable()), "devices": [["cuda:0", "GPU"]]}))
    assert probe.cached() == [("cuda:0", "GPU")]
