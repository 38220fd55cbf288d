"""The process engine forks its workers safely from a process that has used OpenCV's threads
(the in-process audit tests, a notebook that resized images before converting)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys, cv2, numpy as np
from converters.convert import ConvertConfig, convert
cv2.setNumThreads(2)
for _ in range(20):  # OpenCV's pool runs: a large resize is split across its threads
    cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (1000, 1000), interpolation=cv2.INTER_AREA)
m = convert(sys.argv[1], sys.argv[2], ConvertConfig(workers=2, shards=2), progress=False)
assert cv2.getNumThreads() == 2, cv2.getNumThreads()  # the caller's setting is kept
print(m["splits"]["train"]["num_samples"])
"""


def test_process_engine_after_opencv_threads_ran(clean_tree, tmp_path):
    # a subprocess with a timeout: the failure this guards against is a hang, not an error
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(clean_tree), str(tmp_path / "pack")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) > 0
