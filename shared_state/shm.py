"""The shared-memory store: an LMDB environment in the run directory that every process maps.

The state server creates it (empty) when it starts and removes it when it stops; workers map
it and read and write it directly, each write a transaction under LMDB's process-shared
writer mutex (robust: a writer killed in the middle is rolled back, and the next one goes
on). The server stays the owner and the path for what only it may do: ``update`` with a
function, deciding that the owner of a lock died, ``init_once`` records.

Versions: each write stores its transaction id in the version slot of its key (see
``versions``) before it commits, while it holds the writer mutex. A reader reads the slot
first, then the value in a read transaction, and caches the value under that version only
if its snapshot is at least that id: a slot bumped by a write not yet committed (or never:
a writer that died) is not cached. A cached value is served while its slot is unchanged.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING, Any
from zlib import crc32

from shared_state import codec
from shared_state.versions import LOCK_SLOTS, SLOTS, VersionTable, slot_of

if TYPE_CHECKING:
    import lmdb

# The largest the data may grow to; the file is sparse: it takes the space of its data only.
MAP_SIZE = int(os.environ.get("POOL_STATE_MAP_SIZE", 1 << 30))
MAX_READERS = 4096  # read transactions at once, all processes together
_MAX_KEY = 480  # LMDB keys are at most 511 bytes: longer ones are stored under their hash
_ALL: weakref.WeakSet[ShmStore] = weakref.WeakSet()
# This process's environments, by identity of their data file: LMDB forbids opening one
# environment twice in a process, and every ``ShmStore`` of a file shares it.
_ENVS: dict[tuple[int, int], tuple[Any, Any]] = {}
_OPENING = threading.Lock()


def data_path(version_file: str) -> str:
    """The LMDB file beside a version file (LMDB adds ``-lock`` for its lock file)."""
    return version_file + ".mdb"


def files_of(version_file: str) -> list[str]:
    return [data_path(version_file), data_path(version_file) + "-lock"]


# Where the store's pages live: a memory filesystem when there is one, so that the shared
# state is memory the workers map, and a full disk under the run directory can never make
# a write through the mapping fail with SIGBUS. The run directory holds symlinks to them.
SHM_DIR = os.environ.get("POOL_STATE_SHM_DIR", "/dev/shm")


def create_files(version_file: str) -> None:
    """Fresh store files of mode 0600: in ``SHM_DIR`` (linked from beside the version
    file) when it can be written, else beside the version file."""
    import tempfile

    remove_files(version_file)
    if not (SHM_DIR and os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)):
        return
    for link in files_of(version_file):
        fd, target = tempfile.mkstemp(prefix="pool-state-", suffix=".mdb", dir=SHM_DIR)
        os.close(fd)  # made with O_EXCL and mode 0600: nobody else's file
        os.symlink(target, link)


def remove_files(version_file: str) -> None:
    """Remove the store's files, and their targets in ``SHM_DIR``."""
    for path in files_of(version_file):
        try:
            if os.path.islink(path):
                target = os.readlink(path)
                if os.path.dirname(target) == os.path.abspath(SHM_DIR):
                    os.unlink(target)
            os.unlink(path)
        except FileNotFoundError:
            pass


def key_bytes(key: str) -> bytes:
    return locate(key)[0]


def locate(key: str) -> tuple[bytes, int]:
    """``(LMDB key, version slot)`` of a state key."""
    raw = key.encode("utf-8", "surrogatepass")
    if len(raw) < _MAX_KEY:
        return b"k" + raw, crc32(raw) % SLOTS  # never empty: LMDB refuses empty keys
    import hashlib

    return b"h" + hashlib.blake2b(raw, digest_size=24).digest(), crc32(raw) % SLOTS


def key_of(kb: bytes, rec: bytes) -> str:
    if kb[0] == 0x6B:  # b"k"
        return kb[1:].decode("utf-8", "surrogatepass")
    return codec.record_key(rec)


def _record_for(key: str, kb: bytes, rec: bytes) -> bytes:
    if kb[0] == 0x6B:
        return rec
    return codec.with_key(rec, key.encode("utf-8", "surrogatepass"))


def lock_hash(name: str) -> int:
    """A lock name's 64-bit hash, never 0 (the mark of a free entry)."""
    import hashlib

    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") | 1


def lock_owner_word(pid: int, token: str) -> int:
    """The owner word of a holder: its pid, and a number its token makes."""
    return (pid << 32) | (crc32(token.encode()) or 1)


def owner_pid(owner: int) -> int:
    return owner >> 32


class ShmStore:
    """One process's handle on the store: the LMDB environment and the version table."""

    def __init__(self, version_file: str, *, create: bool = False) -> None:
        self.version_file = version_file
        self.path = data_path(version_file)
        if create:
            create_files(version_file)  # the state starts empty with every pool
        self.versions = VersionTable(version_file, writable=True, create=create)
        self.slots = self.versions.slots
        self.locks = self.versions.locks
        self._env: lmdb.Environment | None = None
        self._values: Any = None
        if create:
            self._create_env()
        _ALL.add(self)

    # --- the environment ----------------------------------------------------------------
    def _open(self) -> lmdb.Environment:
        with _OPENING:  # threads of this process share one environment per file
            info = os.stat(self.path)
            ident = (info.st_dev, info.st_ino)
            opened = _ENVS.get(ident)
            if opened is None:
                env = _lmdb_open(self.path, create=False)
                opened = (env, env.open_db(b"values"))
                _ENVS[ident] = opened
            self._values = opened[1]
            self._env = opened[0]
        return opened[0]

    def _create_env(self) -> None:
        """The server's: a new, empty environment, its files of mode 0600."""
        env = _lmdb_open(self.path, create=True)
        env.open_db(b"values")
        env.close()
        self._open()

    def close(self) -> None:
        """Forget the environment (other stores of this process may share it)."""
        self._env = None

    def _read(self) -> Any:
        env = self._env or self._open()
        return env.begin(db=self._values)

    def _write(self) -> Any:
        env = self._env or self._open()
        return env.begin(write=True, db=self._values)

    # --- reads ----------------------------------------------------------------------
    def get(self, key: str, kb: bytes, slot: int) -> tuple[int, bytes | None, bool]:
        """``(version, record or None, cacheable)`` of ``key``, whose slot is ``slot``."""
        seen = self.slots[slot]
        txn = self._read()
        try:
            rec = txn.get(kb)
            snapshot = txn.id()
        finally:
            txn.abort()
        return seen, rec, snapshot >= seen

    def keys(self) -> list[str]:
        txn = self._read()
        try:
            return [key_of(kb, rec) for kb, rec in txn.cursor()]
        finally:
            txn.abort()

    def items(self) -> list[tuple[str, bytes]]:
        txn = self._read()
        try:
            return [(key_of(kb, rec), rec) for kb, rec in txn.cursor()]
        finally:
            txn.abort()

    def length(self) -> int:
        txn = self._read()
        try:
            return int(txn.stat(self._values)["entries"])
        finally:
            txn.abort()

    # --- writes: each one transaction, its id stored in the key's slot before commit ---
    def set(self, key: str, kb: bytes, slot: int, rec: bytes) -> int:
        txn = self._write()
        try:
            txn.put(kb, _record_for(key, kb, rec))
            self.slots[slot] = version = txn.id()
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        return int(version)

    def delete(self, key: str, kb: bytes, slot: int) -> None:
        txn = self._write()
        try:
            if txn.delete(kb):
                self.slots[slot] = txn.id()
            txn.commit()
        except BaseException:
            txn.abort()
            raise

    def clear(self) -> None:
        txn = self._write()
        try:
            version = txn.id()
            for kb, rec in txn.cursor():
                self.slots[slot_of(key_of(kb, rec))] = version
            txn.drop(self._values, delete=False)
            txn.commit()
        except BaseException:
            txn.abort()
            raise

    def incr(self, key: str, kb: bytes, slot: int, amount: int | float) -> tuple[int, Any]:
        txn = self._write()
        try:
            rec = txn.get(kb)
            old = 0 if rec is None else codec.load_record(rec)
            if not isinstance(old, (int, float)) or isinstance(old, bool):
                raise TypeError(f"cannot incr {key!r}: it holds a {type(old).__name__}")
            new = old + amount
            txn.put(kb, _record_for(key, kb, codec.record(new)))
            self.slots[slot] = version = txn.id()
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        return int(version), new

    def setdefault(self, key: str, kb: bytes, slot: int, rec: bytes) -> tuple[int, bytes, bool]:
        """``(version, record now stored, cacheable)``."""
        txn = self._write()
        try:
            current = txn.get(kb)
            version = txn.id()
            if current is None:
                txn.put(kb, current := _record_for(key, kb, rec))
                self.slots[slot] = version
                cacheable = True
            else:
                # Nothing written: the slot holds a committed id, unless a writer died
                # after storing this transaction's id there (then it is not cached).
                seen = self.slots[slot]
                cacheable, version = seen < version, seen
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        return int(version), current, cacheable

    def update(
        self, key: str, kb: bytes, slot: int, fn: Any, default_rec: bytes
    ) -> tuple[int, bytes]:
        """Store ``fn(old)``; ``fn`` runs once, while this process holds the writer mutex."""
        txn = self._write()
        try:
            rec = txn.get(kb)
            new_rec = codec.record(fn(codec.load_record(default_rec if rec is None else rec)))
            txn.put(kb, new_rec := _record_for(key, kb, new_rec))
            self.slots[slot] = version = txn.id()
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        return int(version), new_rec

    # --- named locks: a table in the version file, changed only under the writer mutex ---
    # Entry i is words (name hash, owner) at 2 + 2i; owner 0 is free, else pid << 32 | serial.
    # A name's entry stays assigned once free, so probing never breaks; when half the table
    # is assigned, the next taker compacts it. Taking and releasing cost one empty LMDB
    # write transaction each (its mutex, nothing written to LMDB).
    def _find(self, name_hash: int) -> int:
        """The entry of ``name_hash``, or the free one it would take; -1 when full."""
        table = self.locks
        i = name_hash % LOCK_SLOTS
        for _ in range(LOCK_SLOTS):
            held = table[2 + 2 * i]
            if held == name_hash or held == 0:
                return i
            i = (i + 1) % LOCK_SLOTS
        return -1

    def _compact(self) -> None:
        table = self.locks
        held = [(table[2 + 2 * i], table[3 + 2 * i]) for i in range(LOCK_SLOTS) if table[3 + 2 * i]]
        for i in range(2, len(table)):
            table[i] = 0
        for name_hash, owner in held:
            i = self._find(name_hash)
            table[2 + 2 * i], table[3 + 2 * i] = name_hash, owner
        table[0] = len(held)

    def try_lock(self, name_hash: int, owner: int) -> int:
        """Take the lock (0), or tell who holds it (the owner word)."""
        table = self.locks
        at = 2 + 2 * (name_hash % LOCK_SLOTS)  # where the name is, nearly always
        txn = (self._env or self._open()).begin(write=True)  # the writer mutex
        try:
            if table[at] != name_hash:
                i = self._find(name_hash)
                if i < 0 or table[2 + 2 * i] != name_hash:
                    return self._claim(name_hash, owner, i)
                at = 2 + 2 * i
            current = table[at + 1]
            if current == 0:
                table[at + 1] = owner
            return int(current)
        finally:
            txn.abort()

    def _claim(self, name_hash: int, owner: int, i: int) -> int:
        """Give a name its entry (free entry ``i``), holding the mutex; 0 (taken)."""
        table = self.locks
        if i < 0 or table[0] >= LOCK_SLOTS // 2:
            self._compact()
            i = self._find(name_hash)
        if i < 0:
            raise RuntimeError(f"more than {LOCK_SLOTS} state locks held at once")
        table[3 + 2 * i] = owner
        table[2 + 2 * i] = name_hash
        table[0] += 1
        return 0

    def unlock(self, name_hash: int, owner: int) -> bool:
        """Release the lock if ``owner`` holds it (the server passes a dead owner's word)."""
        table = self.locks
        at = 2 + 2 * (name_hash % LOCK_SLOTS)
        txn = (self._env or self._open()).begin(write=True)
        try:
            if table[at] != name_hash:
                i = self._find(name_hash)
                if i < 0:
                    return False
                at = 2 + 2 * i
            mine = table[at] == name_hash and table[at + 1] == owner
            if mine:
                table[at + 1] = 0
            return mine
        finally:
            txn.abort()

    def lock_owner(self, name_hash: int) -> int:
        """The owner word of a lock (0: free); a glance, not under the mutex."""
        i = self._find(name_hash)
        return 0 if i < 0 or self.locks[2 + 2 * i] != name_hash else int(self.locks[3 + 2 * i])

    def held_locks(self) -> list[tuple[int, int]]:
        """``(name hash, owner word)`` of every held lock; a glance, not under the mutex."""
        table = self.locks
        return [
            (int(table[2 + 2 * i]), int(table[3 + 2 * i]))
            for i in range(LOCK_SLOTS)
            if table[3 + 2 * i]
        ]

    def reader_check(self) -> int:
        """Free the reader slots of dead processes (which would keep old pages alive)."""
        env = self._env or self._open()
        return int(env.reader_check())


_patched = False


def _per_process_identity() -> None:
    """Let a forked child open the environment its parent has open.

    py-lmdb refuses a second open of one environment's files in a process, and a forked
    child inherits that record of what its parent opened. In the child the inherited
    environment must be neither used nor closed (closing it frees the parent's reader
    slots), so the child opens its own: the identity py-lmdb keeps gets the pid added.
    """
    global _patched
    if _patched:
        return
    _patched = True
    try:
        from lmdb import _envid
    except ImportError:  # an lmdb without the guard
        return
    keys = _envid.env_keys

    def env_keys(path: Any, subdir: Any) -> tuple[Any, ...]:
        return tuple((os.getpid(), *key) for key in keys(path, subdir))

    _envid.env_keys = env_keys


def _lmdb_open(path: str, *, create: bool) -> lmdb.Environment:
    import lmdb

    _per_process_identity()
    return lmdb.open(
        path,
        subdir=False,
        map_size=MAP_SIZE,
        writemap=True,  # writes go straight to the shared mapping
        sync=False,  # the state lives as long as its pool: no fsync
        metasync=False,
        lock=True,  # writers serialise on LMDB's process-shared (robust) mutex
        max_dbs=1,
        max_readers=MAX_READERS,
        max_spare_txns=4,
        readahead=False,
        meminit=False,
        mode=0o600,
        create=create,
    )


def _after_fork_in_child() -> None:
    """Environments must not cross ``fork``: in a child, each store opens its file again on
    next use. The inherited environments are kept alive, unused, for the child's lifetime:
    closing one would free the parent's reader slots."""
    global _OPENING
    _OPENING = threading.Lock()  # a thread of the parent may have held it
    if not _ENVS:
        return
    import ctypes

    for store in list(_ALL):
        store._env = None
    for env, _ in _ENVS.values():
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(env))
    _ENVS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
