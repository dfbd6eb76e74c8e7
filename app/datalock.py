"""The lock that allows one `nexus up` per data folder.

Two `nexus up` on one folder would run two Temporal servers on one SQLite
history, which take its shards from each other, and two sets of workers on
one application database.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from app.temporal.devserver import EmbeddedServerError

# The file with the pid and addresses of the `nexus up` that holds the lock,
# which a second one names in its error. A stop deletes it. After a kill, the
# next `nexus up` overwrites it.
OWNER_FILE = "nexus-up.json"


class DataFolderInUseError(EmbeddedServerError):
    """Another `nexus up` has locked the data folder; the message names it."""


class DataFolderLock:
    """An exclusive `flock` on the data folder itself, held until `release`.

    The kernel drops the lock when the process ends, however it ends, so a
    killed `nexus up` leaves no lock behind. Locking the folder rather than
    a file in it writes nothing, so a start that fails later leaves the
    folder as it was.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.owner_path = folder / OWNER_FILE
        self._fd: int | None = None

    def acquire(self, addresses: dict[str, str]) -> None:
        """Take the lock and record this process's pid and `addresses`.

        Raises:
            DataFolderInUseError: another process holds the lock.
        """
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataFolderInUseError(self._in_use_message()) from None
        self._fd = fd
        owner = {"pid": os.getpid(), **addresses}
        partial = self.owner_path.with_name(f".{OWNER_FILE}.{os.getpid()}")
        partial.write_text(json.dumps(owner))
        partial.replace(self.owner_path)

    def release(self) -> None:
        """Delete the owner file and drop the lock, if this object holds it."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.owner_path.unlink()
        os.close(self._fd)
        self._fd = None

    def _in_use_message(self) -> str:
        try:
            owner = json.loads(self.owner_path.read_text())
        except (OSError, ValueError):
            # The holder takes the lock just before it writes the file.
            owner = {}
        if isinstance(owner, dict) and owner.get("pid"):
            details = ", ".join(
                [f"pid {owner['pid']}"]
                + [f"{name} {value}" for name, value in owner.items() if name != "pid"]
            )
        else:
            details = "pid not recorded yet, it is starting"
        return (
            f"the data folder {self.folder} is in use by another `nexus up` "
            f"({details}); stop that one first, or set NEXUS_DATA_DIR to "
            "another folder"
        )
