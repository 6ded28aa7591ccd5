"""The test and bench harness (qaio_testing) leaves nothing behind in the system's temporary directory."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qaio_testing import REPO

pytestmark = pytest.mark.tool

MAKES_SCRATCH = """
import json
from qaio_testing import scratch_dir, scratch_file
directory = scratch_dir("qaio-harness-test-")
(directory / "logs").mkdir()
(directory / "logs" / "access.log").write_text("a line")
log = scratch_file("qaio-harness-test-", ".log")
log.write_text("a worker's log")
print(json.dumps([str(directory), str(log)]))
"""


def test_what_the_harness_makes_in_the_temporary_directory_is_gone_when_its_process_exits():
    done = subprocess.run([sys.executable, "-c", MAKES_SCRATCH], cwd=REPO, capture_output=True, text=True, check=True)
    directory, log = map(Path, json.loads(done.stdout))
    assert directory.name.startswith("qaio-harness-test-") and log.name.endswith(".log")
    assert not directory.exists() and not log.exists()
