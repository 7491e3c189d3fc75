"""Files in the data directory, opened so that nothing planted there is followed.

Directories are created 0700 and files 0600 (the messages are the users' data). Every open uses
O_NOFOLLOW: a symbolic link where a segment, index, probe or group file should be is refused
(OSError ELOOP), never followed, so a planted link cannot make the broker truncate, overwrite or
serve a file outside the directory. A topic directory must be a real directory inside the data
directory (checked by what its path resolves to).
"""

from __future__ import annotations

import errno
import os
import stat

DIR_MODE = 0o700
FILE_MODE = 0o600
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def make_private_dir(path: str, root: str | None = None) -> None:
    """Create `path` (and its parents) for the owner only; an existing one must be a real
    directory (not a symbolic link) and, given `root`, resolve to a place inside it. Raises OSError."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ELOOP if stat.S_ISLNK(st.st_mode) else errno.ENOTDIR, "not a directory (a symbolic link is refused)", path)
    if root is not None and os.path.dirname(os.path.realpath(path)) != os.path.realpath(root):
        raise OSError(errno.EXDEV, "resolves outside the data directory", path)
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(path, DIR_MODE)


def is_real_dir(path: str) -> bool:
    """A directory, not a symbolic link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def open_fd(path: str, flags: int) -> int:
    """os.open without following a symbolic link; a file it creates is 0600. Raises OSError."""
    return os.open(path, flags | NOFOLLOW, FILE_MODE)


def open_read(path: str):
    """A binary file object for reading, without following a symbolic link. Raises OSError."""
    return os.fdopen(open_fd(path, os.O_RDONLY), "rb")


def write_private(path: str, data: bytes, sync: bool = True) -> None:
    """Write `data` to `path` (created 0600, truncated, never through a link). Raises OSError."""
    fd = open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
