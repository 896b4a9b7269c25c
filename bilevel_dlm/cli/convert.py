"""bilevel-dlm convert-checkpoint: rewrite an earlier release's checkpoint (a pickled training state) in the
current format (safetensors + JSON), so that loading it never reads a pickle again."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..checkpoint import atomic_directory_write, resolve_checkpoint, verify_checkpoint
from ..state_files import LEGACY_STATE, read_state, write_state
from .common import existing, reported

__all__ = ["run", "convert_checkpoint"]


def convert_checkpoint(directory: Path) -> bool:
    """Rewrite one verified checkpoint in place (atomically); False when it has no pickled state to convert."""
    verify_checkpoint(directory)
    if not (directory / LEGACY_STATE).exists():
        return False
    state = read_state(directory, allow_pickle=True)

    def write(tmp: Path) -> None:
        shutil.copytree(directory, tmp, dirs_exist_ok=True)
        (tmp / LEGACY_STATE).unlink()
        write_state(state, tmp)

    atomic_directory_write(directory, write)
    return True


def run(args: argparse.Namespace) -> int:
    root = existing(args.path, "DIR")
    folders = sorted(p for p in root.glob("checkpoint-*") if p.is_dir()) or [root]
    for folder in folders:
        with reported(f"{folder}"):
            converted = convert_checkpoint(resolve_checkpoint(folder))
        print(f"{folder}: {'converted' if converted else 'already in the current format'}")
    return 0
