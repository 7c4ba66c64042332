"""The one exception type for data problems a user can cause and fix, and the one line for a
write that the machine refused."""
import errno


class DataError(Exception):
    """A user-fixable data problem (bad path, empty corpus, corrupt files, ...).

    The message is one line naming the problem and the fix; the CLI prints it without a
    traceback.
    """


_STORAGE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file too large for this file system or limit",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted"}


def storage_message(e: OSError) -> str | None:
    """One line for a write the machine refused (full disk, quota, read-only, ...), else None.
    Files are written via temp names and renames, so what was saved before is intact."""
    why = _STORAGE.get(e.errno)
    if why is None:
        return None
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):  # no space to free: the folder refuses writes
        return (f"writing{where} failed: {why}: the folder is not writable: make it writable (chmod, "
                "remount) or point data.cache_dir / train.run_root at a writable folder, then run the "
                "same command again (what was saved before is kept)")
    return (f"writing{where} failed: {why}: free space or point data.cache_dir / train.run_root "
            "elsewhere, then run the same command again (what was saved before is kept)")
