"""What a failed write means for a user: a full disk said as such."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


def disk_full_message(exc: BaseException, folder: str | os.PathLike, rerun: str = "run snakemake again") -> str | None:
    """What to tell a user whose write failed because the disk is full, or None for another failure.

    torch reports a full disk while saving as "unexpected pos ..." (its zip
    writer's check), other writers as OSError ENOSPC.
    """
    text = str(exc)
    if not (getattr(exc, "errno", None) == errno.ENOSPC or "unexpected pos" in text or "No space left" in text):
        return None
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free / 2**20
    return (f"writing to {folder} failed ({type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}): the "
            f"disk holding it has {free:,.0f} MB free, so it is most likely full. Free space there (or put the "
            f"workflow's folder on a larger disk) and {rerun}.")
