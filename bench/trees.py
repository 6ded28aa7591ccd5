"""Benchmarks that compare source trees in one sitting: this checkout, and with `--before` another one
(e.g. `git worktree add /tmp/before <commit>`), each run the same way."""
from __future__ import annotations

import json
import subprocess
from typing import Callable

from qaio_testing import REPO


def tree_env(tree: str) -> dict[str, str]:
    """The environment a worker needs to run another checkout's code."""
    return {} if tree == str(REPO) else {"PYTHONPATH": f"{tree}/worker:{tree}"}


def tree_conf(tree: str) -> str:
    """The checkout's own gunicorn settings, which its code reads."""
    return f"{tree}/worker/gunicorn.conf.py"


def commit_of(tree: str) -> str:
    """The tree's commit, with `+ changes` when its tracked files differ from it."""
    commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return commit.stdout.strip() + (" + changes" if dirty else "")


def measure_trees(before: str | list[str] | None, measure: Callable[[str], dict]) -> list[dict]:
    """`measure(tree)` for the other checkouts first (one, or several in the order given), then this one;
    each printed as it ends."""
    befores = [before] if isinstance(before, str) else list(before or [])
    runs = []
    for name, tree in [("before", tree) for tree in befores] + [("this tree", str(REPO))]:
        if tree:
            runs.append({"name": name, "tree": tree, "commit": commit_of(tree), **measure(tree)})
            print(json.dumps(runs[-1]), flush=True)
    return runs
