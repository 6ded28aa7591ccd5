"""Review texts from the shared waimai data set, spread over the file and repeatable."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from qaio_testing import REPO

# ../shared beside the checkout; .device/shared where device-prep.sh packed it for a GPU machine.
CANDIDATES = [REPO.parent / "shared" / "data" / "waimai_10k.csv", REPO / ".device" / "shared" / "data" / "waimai_10k.csv"]


def data_path() -> Path:
    configured = os.environ.get("QAIO_BENCH_DATA")
    if configured:
        return Path(configured)
    return next((p for p in CANDIDATES if p.exists()), CANDIDATES[0])


def review_texts(count: int) -> list[str]:
    with open(data_path(), encoding="utf-8") as fh:
        rows = [row["review"] for row in csv.DictReader(fh)]
    return [rows[(i * 37) % len(rows)] for i in range(count)]
