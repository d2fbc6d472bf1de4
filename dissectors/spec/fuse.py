"""FUSE kernel protocol up to 7.45, as tables.

Struct and field names follow include/uapi/linux/fuse.h so that the C-header
oracle can compare offsets by name.  `@N` marks the minor that gave a field its
current layout; `~old` names the 7.38 predecessor of a renamed field.
"""

from __future__ import annotations

import errno as _errno

from .types import (
    Enum,
    FlagSet,
    Notify,
    Opcode,
    Part,
    Registry,
    S,
    array,
    bits,
    data,
    name,
    st,
)

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 45
ROOT_ID = 1
MIN_READ_BUFFER = 8192
# Largest message we accept: max_pages (256) * 4 KiB plus headers, with room for 1 MiB+ writes.
MAX_MESSAGE = 32 * 1024 * 1024
NAME_MAX = 1024  # longest name accepted in a message (PATH_MAX-ish for symlink targets is separate)
PATH_MAX = 4096
XATTR_SIZE_MAX = 65536

# ---------------------------------------------------------------------------------------------
# Flag sets
# ---------------------------------------------------------------------------------------------
INIT_FLAGS = bits(
    "FUSE_",
    {
        "ASYNC_READ": 0, "POSIX_LOCKS": 1, "FILE_OPS": 2, "ATOMIC_O_TRUNC": 3, "EXPORT_SUPPORT": 4,
        "BIG_WRITES": 5, "DONT_MASK": 6, "SPLICE_WRITE": 7, "SPLICE_MOVE": 8, "SPLICE_READ": 9,
        "FLOCK_LOCKS": 10, "HAS_IOCTL_DIR": 11, "AUTO_INVAL_DATA": 12, "DO_READDIRPLUS": 13,
        "READDIRPLUS_AUTO": 14, "ASYNC_DIO": 15, "WRITEBACK_CACHE": 16, "NO_OPEN_SUPPORT": 17,
        "PARALLEL_DIROPS": 18, "HANDLE_KILLPRIV": 19, "POSIX_ACL": 20, "ABORT_ERROR": 21,
        "MAX_PAGES": 22, "CACHE_SYMLINKS": 23, "NO_OPENDIR_SUPPORT": 24, "EXPLICIT_INVAL_DATA": 25,
        "MAP_ALIGNMENT": 26, "SUBMOUNTS": 27, "HANDLE_KILLPRIV_V2": 28, "SETXATTR_EXT": 29,
        "INIT_EXT": 30, "INIT_RESERVED": 31,
        # bits 32..63 travel in flags2
        "SECURITY_CTX": 32, "HAS_INODE_DAX": 33, "CREATE_SUPP_GROUP": 34, "HAS_EXPIRE_ONLY": 35,
        "DIRECT_IO_ALLOW_MMAP": 36, "PASSTHROUGH": 37, "NO_EXPORT_SUPPORT": 38, "HAS_RESEND": 39,
        "ALLOW_IDMAP": 40, "OVER_IO_URING": 41, "REQUEST_TIMEOUT": 42,
    },
    name="INIT_FLAGS",
)
# The high half as it appears in the flags2 field on the wire.
INIT_FLAGS2 = FlagSet("INIT_FLAGS2", tuple((n, v >> 32) for n, v in INIT_FLAGS.bits if v >> 32), "FUSE_")
CUSE_INIT_FLAGS = bits("CUSE_", {"UNRESTRICTED_IOCTL": 0}, name="CUSE_INIT_FLAGS")
FATTR = bits(
    "FATTR_",
    {"MODE": 0, "UID": 1, "GID": 2, "SIZE": 3, "ATIME": 4, "MTIME": 5, "FH": 6, "ATIME_NOW": 7,
     "MTIME_NOW": 8, "LOCKOWNER": 9, "CTIME": 10, "KILL_SUIDGID": 11},
    name="FATTR",
)
FOPEN = bits(
    "FOPEN_",
    {"DIRECT_IO": 0, "KEEP_CACHE": 1, "NONSEEKABLE": 2, "CACHE_DIR": 3, "STREAM": 4, "NOFLUSH": 5,
     "PARALLEL_DIRECT_WRITES": 6, "PASSTHROUGH": 7},
    name="FOPEN",
)
ATTR_FLAGS = bits("FUSE_ATTR_", {"SUBMOUNT": 0, "DAX": 1}, name="ATTR_FLAGS")
RELEASE_FLAGS = bits("FUSE_RELEASE_", {"FLUSH": 0, "FLOCK_UNLOCK": 1}, name="RELEASE_FLAGS")
GETATTR_FLAGS = bits("FUSE_GETATTR_", {"FH": 0}, name="GETATTR_FLAGS")
LK_FLAGS = bits("FUSE_LK_", {"FLOCK": 0}, name="LK_FLAGS")
WRITE_FLAGS = bits("FUSE_WRITE_", {"CACHE": 0, "LOCKOWNER": 1, "KILL_SUIDGID": 2}, name="WRITE_FLAGS")
READ_FLAGS = bits("FUSE_READ_", {"LOCKOWNER": 1}, name="READ_FLAGS")
IOCTL_FLAGS = bits(
    "FUSE_IOCTL_",
    {"COMPAT": 0, "UNRESTRICTED": 1, "RETRY": 2, "32BIT": 3, "DIR": 4, "COMPAT_X32": 5},
    name="IOCTL_FLAGS",
)
POLL_FLAGS = bits("FUSE_POLL_", {"SCHEDULE_NOTIFY": 0}, name="POLL_FLAGS")
FSYNC_FLAGS = bits("FUSE_FSYNC_", {"FDATASYNC": 0}, name="FSYNC_FLAGS")
OPEN_IN_FLAGS = bits("FUSE_OPEN_", {"KILL_SUIDGID": 0}, name="OPEN_IN_FLAGS")
SETXATTR_FLAGS = bits("FUSE_SETXATTR_", {"ACL_KILL_SGID": 0}, name="SETXATTR_FLAGS")
EXPIRE_FLAGS = bits("FUSE_", {"EXPIRE_ONLY": 0}, name="EXPIRE_FLAGS")
SETUPMAPPING_FLAGS = bits("FUSE_SETUPMAPPING_FLAG_", {"WRITE": 0, "READ": 1}, name="SETUPMAPPING_FLAGS")
RENAME_FLAGS = bits("RENAME_", {"NOREPLACE": 0, "EXCHANGE": 1, "WHITEOUT": 2}, name="RENAME_FLAGS")
ACCESS_MASK = bits("", {"X_OK": 0, "W_OK": 1, "R_OK": 2}, name="ACCESS_MASK")
XATTR_FLAGS = bits("XATTR_", {"CREATE": 0, "REPLACE": 1}, name="XATTR_FLAGS")
FALLOCATE_MODE = bits(
    "FALLOC_FL_",
    {"KEEP_SIZE": 0, "PUNCH_HOLE": 1, "NO_HIDE_STALE": 2, "COLLAPSE_RANGE": 3, "ZERO_RANGE": 4,
     "INSERT_RANGE": 5, "UNSHARE_RANGE": 6},
    name="FALLOCATE_MODE",
)
STATX_MASK = bits(
    "STATX_",
    {"TYPE": 0, "MODE": 1, "NLINK": 2, "UID": 3, "GID": 4, "ATIME": 5, "MTIME": 6, "CTIME": 7, "INO": 8,
     "SIZE": 9, "BLOCKS": 10, "BTIME": 11, "MNT_ID": 12, "DIOALIGN": 13, "MNT_ID_UNIQUE": 14,
     "SUBVOL": 15, "WRITE_ATOMIC": 16},
    name="STATX_MASK",
)
POLL_EVENTS = bits(
    "POLL",
    {"IN": 0, "PRI": 1, "OUT": 2, "ERR": 3, "HUP": 4, "NVAL": 5, "RDNORM": 6, "RDBAND": 7, "WRNORM": 8,
     "WRBAND": 9, "MSG": 10, "REMOVE": 12, "RDHUP": 13},
    name="POLL_EVENTS",
)
# open(2) flags other than the access mode (rendered together with O_ACCMODE by the renderer).
OPEN_FLAGS = FlagSet(
    "OPEN_FLAGS",
    (
        ("O_CREAT", 0o100), ("O_EXCL", 0o200), ("O_NOCTTY", 0o400), ("O_TRUNC", 0o1000),
        ("O_APPEND", 0o2000), ("O_NONBLOCK", 0o4000), ("O_DSYNC", 0o10000), ("O_ASYNC", 0o20000),
        ("O_DIRECT", 0o40000), ("O_LARGEFILE", 0o100000), ("O_DIRECTORY", 0o200000),
        ("O_NOFOLLOW", 0o400000), ("O_NOATIME", 0o1000000), ("O_CLOEXEC", 0o2000000),
        ("__O_SYNC", 0o4000000), ("O_PATH", 0o10000000), ("__O_TMPFILE", 0o20000000),
    ),
    "",
)

FLAGSETS: tuple[FlagSet, ...] = (
    INIT_FLAGS, INIT_FLAGS2, CUSE_INIT_FLAGS, FATTR, FOPEN, ATTR_FLAGS, RELEASE_FLAGS, GETATTR_FLAGS,
    LK_FLAGS, WRITE_FLAGS, READ_FLAGS, IOCTL_FLAGS, POLL_FLAGS, FSYNC_FLAGS, OPEN_IN_FLAGS,
    SETXATTR_FLAGS, EXPIRE_FLAGS, SETUPMAPPING_FLAGS, RENAME_FLAGS, ACCESS_MASK, XATTR_FLAGS,
    FALLOCATE_MODE, STATX_MASK, POLL_EVENTS, OPEN_FLAGS,
)

# ---------------------------------------------------------------------------------------------
# Enums
# ---------------------------------------------------------------------------------------------
DIRENT_TYPE = Enum(
    "DIRENT_TYPE",
    (("DT_UNKNOWN", 0), ("DT_FIFO", 1), ("DT_CHR", 2), ("DT_DIR", 4), ("DT_BLK", 6), ("DT_REG", 8),
     ("DT_LNK", 10), ("DT_SOCK", 12), ("DT_WHT", 14)),
)
LOCK_TYPE = Enum("LOCK_TYPE", (("F_RDLCK", 0), ("F_WRLCK", 1), ("F_UNLCK", 2)))
WHENCE = Enum("WHENCE", (("SEEK_SET", 0), ("SEEK_CUR", 1), ("SEEK_END", 2), ("SEEK_DATA", 3), ("SEEK_HOLE", 4)))
EXT_TYPE = Enum("EXT_TYPE", (("FUSE_MAX_NR_SECCTX", 31), ("FUSE_EXT_GROUPS", 32)))
URING_CMD = Enum(
    "URING_CMD",
    (("FUSE_IO_URING_CMD_INVALID", 0), ("FUSE_IO_URING_CMD_REGISTER", 1),
     ("FUSE_IO_URING_CMD_COMMIT_AND_FETCH", 2)),
)

# ---------------------------------------------------------------------------------------------
# Structs
# ---------------------------------------------------------------------------------------------
STRUCTS = (
    S("fuse_attr", """u64 ino; u64 size; u64 blocks; u64 atime; u64 mtime; u64 ctime;
        u32 atimensec; u32 mtimensec; u32 ctimensec; u32 mode:MODE; u32 nlink; u32 uid; u32 gid;
        u32 rdev; u32 blksize; u32 flags:ATTR_FLAGS""", doc="flags bit 0 is FUSE_ATTR_SUBMOUNT"),
    S("fuse_sx_time", "i64 tv_sec; u32 tv_nsec; i32 __reserved", since=39),
    S("fuse_statx", """u32 mask:STATX_MASK; u32 blksize; u64 attributes; u32 nlink; u32 uid; u32 gid;
        u16 mode:MODE; u16 __spare0[1]; u64 ino; u64 size; u64 blocks; u64 attributes_mask;
        fuse_sx_time atime; fuse_sx_time btime; fuse_sx_time ctime; fuse_sx_time mtime;
        u32 rdev_major; u32 rdev_minor; u32 dev_major; u32 dev_minor; u64 __spare2[14]""", since=39),
    S("fuse_kstatfs", """u64 blocks; u64 bfree; u64 bavail; u64 files; u64 ffree; u32 bsize; u32 namelen;
        u32 frsize; u32 padding; u32 spare[6]"""),
    S("fuse_file_lock", "u64 start; u64 end; u32 type=LOCK_TYPE; u32 pid"),
    S("fuse_entry_out", """u64 nodeid; u64 generation; u64 entry_valid; u64 attr_valid;
        u32 entry_valid_nsec; u32 attr_valid_nsec; fuse_attr attr""", compat=(120,)),
    S("fuse_forget_in", "u64 nlookup"),
    S("fuse_forget_one", "u64 nodeid; u64 nlookup"),
    S("fuse_batch_forget_in", "u32 count; u32 dummy"),
    S("fuse_getattr_in", "u32 getattr_flags:GETATTR_FLAGS; u32 dummy; u64 fh"),
    S("fuse_attr_out", "u64 attr_valid; u32 attr_valid_nsec; u32 dummy; fuse_attr attr", compat=(96,)),
    S("fuse_statx_in", "u32 getattr_flags:GETATTR_FLAGS; u32 reserved; u64 fh; u32 sx_flags; u32 sx_mask:STATX_MASK",
      since=39),
    S("fuse_statx_out", "u64 attr_valid; u32 attr_valid_nsec; u32 flags; u64 spare[2]; fuse_statx stat",
      since=39),
    S("fuse_mknod_in", "u32 mode:MODE; u32 rdev; u32 umask:OCTAL; u32 padding", compat=(8,)),
    S("fuse_mkdir_in", "u32 mode:MODE; u32 umask:OCTAL"),
    S("fuse_rename_in", "u64 newdir"),
    S("fuse_rename2_in", "u64 newdir; u32 flags:RENAME_FLAGS; u32 padding"),
    S("fuse_link_in", "u64 oldnodeid"),
    S("fuse_setattr_in", """u32 valid:FATTR; u32 padding; u64 fh; u64 size; u64 lock_owner; u64 atime;
        u64 mtime; u64 ctime; u32 atimensec; u32 mtimensec; u32 ctimensec; u32 mode:MODE; u32 unused4;
        u32 uid; u32 gid; u32 unused5"""),
    S("fuse_open_in", "u32 flags:OFLAGS; u32 open_flags:OPEN_IN_FLAGS"),
    S("fuse_create_in", "u32 flags:OFLAGS; u32 mode:MODE; u32 umask:OCTAL; u32 open_flags:OPEN_IN_FLAGS"),
    S("fuse_open_out", "u64 fh; u32 open_flags:FOPEN; i32 backing_id @40 ~padding"),
    S("fuse_release_in", "u64 fh; u32 flags:OFLAGS; u32 release_flags:RELEASE_FLAGS; u64 lock_owner"),
    S("fuse_flush_in", "u64 fh; u32 unused; u32 padding; u64 lock_owner"),
    S("fuse_read_in", """u64 fh; u64 offset; u32 size; u32 read_flags:READ_FLAGS; u64 lock_owner;
        u32 flags:OFLAGS; u32 padding"""),
    S("fuse_write_in", """u64 fh; u64 offset; u32 size; u32 write_flags:WRITE_FLAGS; u64 lock_owner;
        u32 flags:OFLAGS; u32 padding""", compat=(24,)),
    S("fuse_write_out", "u32 size; u32 padding"),
    S("fuse_statfs_out", "fuse_kstatfs st", compat=(48,)),
    S("fuse_fsync_in", "u64 fh; u32 fsync_flags:FSYNC_FLAGS; u32 padding"),
    S("fuse_setxattr_in", "u32 size; u32 flags:XATTR_FLAGS; u32 setxattr_flags:SETXATTR_FLAGS; u32 padding",
      compat=(8,)),
    S("fuse_getxattr_in", "u32 size; u32 padding"),
    S("fuse_getxattr_out", "u32 size; u32 padding"),
    S("fuse_lk_in", "u64 fh; u64 owner; fuse_file_lock lk; u32 lk_flags:LK_FLAGS; u32 padding"),
    S("fuse_lk_out", "fuse_file_lock lk"),
    S("fuse_access_in", "u32 mask:ACCESS_MASK; u32 padding"),
    S("fuse_init_in", """u32 major; u32 minor; u32 max_readahead; u32 flags:INIT_FLAGS;
        u32 flags2:INIT_FLAGS2 @36; u32 unused[11] @36""", compat=(16,)),
    S("fuse_init_out", """u32 major; u32 minor; u32 max_readahead; u32 flags:INIT_FLAGS;
        u16 max_background; u16 congestion_threshold; u32 max_write; u32 time_gran @23;
        u16 max_pages @28; u16 map_alignment @31; u32 flags2:INIT_FLAGS2 @36;
        u32 max_stack_depth @40 ~unused; u16 request_timeout @43; u16 unused[11] @43""", compat=(8, 24)),
    S("cuse_init_in", "u32 major; u32 minor; u32 unused; u32 flags:CUSE_INIT_FLAGS"),
    S("cuse_init_out", """u32 major; u32 minor; u32 unused; u32 flags:CUSE_INIT_FLAGS; u32 max_read;
        u32 max_write; u32 dev_major; u32 dev_minor; u32 spare[10]"""),
    S("fuse_interrupt_in", "u64 unique"),
    S("fuse_bmap_in", "u64 block; u32 blocksize; u32 padding"),
    S("fuse_bmap_out", "u64 block"),
    S("fuse_ioctl_in", "u64 fh; u32 flags:IOCTL_FLAGS; u32 cmd:HEX; u64 arg:HEX; u32 in_size; u32 out_size"),
    S("fuse_ioctl_iovec", "u64 base:HEX; u64 len"),
    S("fuse_ioctl_out", "i32 result; u32 flags:IOCTL_FLAGS; u32 in_iovs; u32 out_iovs"),
    S("fuse_poll_in", "u64 fh; u64 kh; u32 flags:POLL_FLAGS; u32 events:POLL_EVENTS"),
    S("fuse_poll_out", "u32 revents:POLL_EVENTS; u32 padding"),
    S("fuse_notify_poll_wakeup_out", "u64 kh"),
    S("fuse_fallocate_in", "u64 fh; u64 offset; u64 length; u32 mode:FALLOCATE_MODE; u32 padding"),
    S("fuse_in_header", """u32 len; u32 opcode=OPCODE; u64 unique; u64 nodeid; u32 uid; u32 gid; u32 pid;
        u16 total_extlen; u16 padding"""),
    S("fuse_out_header", "u32 len; i32 error:ERRNO; u64 unique"),
    S("fuse_dirent", "u64 ino; u64 off; u32 namelen; u32 type=DIRENT_TYPE",
      doc="followed by name[namelen], padded to 8 bytes"),
    S("fuse_direntplus", "fuse_entry_out entry_out; fuse_dirent dirent"),
    S("fuse_notify_inval_inode_out", "u64 ino; i64 off; i64 len"),
    S("fuse_notify_inval_entry_out", "u64 parent; u32 namelen; u32 flags:EXPIRE_FLAGS"),
    S("fuse_notify_delete_out", "u64 parent; u64 child; u32 namelen; u32 padding"),
    S("fuse_notify_store_out", "u64 nodeid; u64 offset; u32 size; u32 padding"),
    S("fuse_notify_retrieve_out", "u64 notify_unique; u64 nodeid; u64 offset; u32 size; u32 padding"),
    S("fuse_notify_retrieve_in", "u64 dummy1; u64 offset; u32 size; u32 dummy2; u64 dummy3; u64 dummy4"),
    S("fuse_notify_prune_out", "u32 count; u32 padding; u64 spare", since=45),
    S("fuse_backing_map", "i32 fd; u32 flags; u64 padding", since=40),
    S("fuse_lseek_in", "u64 fh; u64 offset; u32 whence=WHENCE; u32 padding"),
    S("fuse_lseek_out", "u64 offset"),
    S("fuse_copy_file_range_in", "u64 fh_in; u64 off_in; u64 nodeid_out; u64 fh_out; u64 off_out; u64 len; u64 flags"),
    S("fuse_copy_file_range_out", "u64 bytes_copied", since=45),
    S("fuse_setupmapping_in", "u64 fh; u64 foffset; u64 len; u64 flags:SETUPMAPPING_FLAGS; u64 moffset"),
    S("fuse_removemapping_in", "u32 count"),
    S("fuse_removemapping_one", "u64 moffset; u64 len"),
    S("fuse_syncfs_in", "u64 padding"),
    S("fuse_secctx", "u32 size; u32 padding"),
    S("fuse_secctx_header", "u32 size; u32 nr_secctx"),
    S("fuse_ext_header", "u32 size; u32 type=EXT_TYPE"),
    S("fuse_supp_groups", "u32 nr_groups", since=39, doc="followed by u32 groups[nr_groups]"),
    S("fuse_uring_ent_in_out", "u64 flags; u64 commit_id; u32 payload_sz; u32 padding; u64 reserved", since=42),
    S("fuse_uring_req_header", "char in_out[128]; char op_in[128]; fuse_uring_ent_in_out ring_ent_in_out",
      since=42),
    S("fuse_uring_cmd_req", "u64 flags; u64 commit_id; u16 qid; u8 padding[6]", since=42),
)

# ---------------------------------------------------------------------------------------------
# Opcodes: request body parts and reply body parts
# ---------------------------------------------------------------------------------------------
ENTRY = (st("entry", "fuse_entry_out"),)
ATTR = (st("attr_out", "fuse_attr_out"),)
EMPTY: tuple[Part, ...] = ()
OPEN_OUT = (st("open", "fuse_open_out"),)
XATTR_REPLY = (Part("xattr", "xattr", "fuse_getxattr_out"),)

OPCODES = (
    Opcode("LOOKUP", 1, (name(),), ENTRY),
    Opcode("FORGET", 2, (st("forget", "fuse_forget_in"),), None, queue="hiprio"),
    Opcode("GETATTR", 3, (st("getattr", "fuse_getattr_in", optional=True),), ATTR),
    Opcode("SETATTR", 4, (st("setattr", "fuse_setattr_in"),), ATTR),
    Opcode("READLINK", 5, EMPTY, (Part("text", "target"),)),
    Opcode("SYMLINK", 6, (name(), name("target")), ENTRY),
    Opcode("MKNOD", 8, (st("mknod", "fuse_mknod_in"), name()), ENTRY),
    Opcode("MKDIR", 9, (st("mkdir", "fuse_mkdir_in"), name()), ENTRY),
    Opcode("UNLINK", 10, (name(),), EMPTY),
    Opcode("RMDIR", 11, (name(),), EMPTY),
    Opcode("RENAME", 12, (st("rename", "fuse_rename_in"), name(), name("newname")), EMPTY),
    Opcode("LINK", 13, (st("link", "fuse_link_in"), name("newname")), ENTRY),
    Opcode("OPEN", 14, (st("open", "fuse_open_in"),), OPEN_OUT),
    Opcode("READ", 15, (st("read", "fuse_read_in"),), (data(),)),
    Opcode("WRITE", 16, (st("write", "fuse_write_in"), data()), (st("write_out", "fuse_write_out"),)),
    Opcode("STATFS", 17, EMPTY, (st("statfs", "fuse_statfs_out"),)),
    Opcode("RELEASE", 18, (st("release", "fuse_release_in"),), EMPTY),
    Opcode("FSYNC", 20, (st("fsync", "fuse_fsync_in"),), EMPTY),
    Opcode("SETXATTR", 21, (st("setxattr", "fuse_setxattr_in"), name(), data("value")), EMPTY),
    Opcode("GETXATTR", 22, (st("getxattr", "fuse_getxattr_in"), name()), XATTR_REPLY),
    Opcode("LISTXATTR", 23, (st("getxattr", "fuse_getxattr_in"),), XATTR_REPLY),
    Opcode("REMOVEXATTR", 24, (name(),), EMPTY),
    Opcode("FLUSH", 25, (st("flush", "fuse_flush_in"),), EMPTY),
    Opcode("INIT", 26, (st("init", "fuse_init_in"),), (st("init_out", "fuse_init_out"),)),
    Opcode("OPENDIR", 27, (st("open", "fuse_open_in"),), OPEN_OUT),
    Opcode("READDIR", 28, (st("read", "fuse_read_in"),), (Part("dirents", "entries", "fuse_dirent"),)),
    Opcode("RELEASEDIR", 29, (st("release", "fuse_release_in"),), EMPTY),
    Opcode("FSYNCDIR", 30, (st("fsync", "fuse_fsync_in"),), EMPTY),
    Opcode("GETLK", 31, (st("lk", "fuse_lk_in"),), (st("lk_out", "fuse_lk_out"),), needs="POSIX_LOCKS"),
    Opcode("SETLK", 32, (st("lk", "fuse_lk_in"),), EMPTY, needs="POSIX_LOCKS"),
    Opcode("SETLKW", 33, (st("lk", "fuse_lk_in"),), EMPTY, needs="POSIX_LOCKS"),
    Opcode("ACCESS", 34, (st("access", "fuse_access_in"),), EMPTY),
    Opcode("CREATE", 35, (st("create", "fuse_create_in"), name()), ENTRY + OPEN_OUT),
    Opcode("INTERRUPT", 36, (st("interrupt", "fuse_interrupt_in"),), EMPTY, reply_optional=True),
    Opcode("BMAP", 37, (st("bmap", "fuse_bmap_in"),), (st("bmap_out", "fuse_bmap_out"),)),
    Opcode("DESTROY", 38, EMPTY, EMPTY),
    Opcode("IOCTL", 39, (st("ioctl", "fuse_ioctl_in"), data()), (st("ioctl_out", "fuse_ioctl_out"), data())),
    Opcode("POLL", 40, (st("poll", "fuse_poll_in"),), (st("poll_out", "fuse_poll_out"),)),
    Opcode("NOTIFY_REPLY", 41, (st("retrieve", "fuse_notify_retrieve_in"), data()), None),
    Opcode("BATCH_FORGET", 42, (st("batch", "fuse_batch_forget_in"),
                                array("forgets", "fuse_forget_one", "batch.count")), None, queue="hiprio"),
    Opcode("FALLOCATE", 43, (st("fallocate", "fuse_fallocate_in"),), EMPTY),
    Opcode("READDIRPLUS", 44, (st("read", "fuse_read_in"),),
           (Part("direntplus", "entries", "fuse_direntplus"),), since=21, needs="DO_READDIRPLUS"),
    Opcode("RENAME2", 45, (st("rename", "fuse_rename2_in"), name(), name("newname")), EMPTY, since=23),
    Opcode("LSEEK", 46, (st("lseek", "fuse_lseek_in"),), (st("lseek_out", "fuse_lseek_out"),), since=24),
    Opcode("COPY_FILE_RANGE", 47, (st("copy", "fuse_copy_file_range_in"),),
           (st("write_out", "fuse_write_out"),), since=28),
    Opcode("SETUPMAPPING", 48, (st("setupmapping", "fuse_setupmapping_in"),), EMPTY, since=31,
           doc="DAX: map a file range into the shared window"),
    Opcode("REMOVEMAPPING", 49, (st("removemapping", "fuse_removemapping_in"),
                                 array("mappings", "fuse_removemapping_one", "removemapping.count")),
           EMPTY, since=31),
    Opcode("SYNCFS", 50, (st("syncfs", "fuse_syncfs_in"),), EMPTY, since=34,
           doc="sent once per superblock (root and each submount root) on sync/syncfs"),
    Opcode("TMPFILE", 51, (st("create", "fuse_create_in"), name()), ENTRY + OPEN_OUT, since=37),
    Opcode("STATX", 52, (st("statx", "fuse_statx_in"),), (st("statx_out", "fuse_statx_out"),), since=39),
    Opcode("COPY_FILE_RANGE_64", 53, (st("copy", "fuse_copy_file_range_in"),),
           (st("copy_out", "fuse_copy_file_range_out"),), since=45),
    Opcode("CUSE_INIT", 4096, (st("init", "cuse_init_in"),),
           (st("init_out", "cuse_init_out"), Part("strs", "dev_info", optional=True))),
)

# FUSE's lookup count (nlookup): each entry with a nonzero nodeid in a successful reply to one of these
# opcodes is one lookup the kernel holds on that node (READDIRPLUS: each entry of the reply); FORGET and
# BATCH_FORGET give lookups back, and a back-end may free a node once all it granted came back.
GRANTS_LOOKUP = frozenset({"LOOKUP", "MKNOD", "MKDIR", "SYMLINK", "LINK", "CREATE", "TMPFILE", "READDIRPLUS"})
RETURNS_LOOKUP = frozenset({"FORGET", "BATCH_FORGET"})

NOTIFIES = (
    Notify("POLL", 1, (st("poll", "fuse_notify_poll_wakeup_out"),), 11),
    Notify("INVAL_INODE", 2, (st("inval_inode", "fuse_notify_inval_inode_out"),), 12),
    Notify("INVAL_ENTRY", 3, (st("inval_entry", "fuse_notify_inval_entry_out"), name()), 12),
    Notify("STORE", 4, (st("store", "fuse_notify_store_out"), data()), 15),
    Notify("RETRIEVE", 5, (st("retrieve", "fuse_notify_retrieve_out"),), 15),
    Notify("DELETE", 6, (st("delete", "fuse_notify_delete_out"), name()), 18),
    Notify("RESEND", 7, EMPTY, 40, doc="kernel re-queues all requests in flight"),
    Notify("INC_EPOCH", 8, EMPTY, 44, doc="invalidate all dentries of older epochs"),
    Notify("PRUNE", 9, (st("prune", "fuse_notify_prune_out"), array("nodeids", "u64", "prune.count")), 45),
)

OPCODE = Enum("OPCODE", tuple((o.name, o.value) for o in OPCODES), "FUSE_")
NOTIFY_CODE = Enum("NOTIFY_CODE", tuple((n.name, n.value) for n in NOTIFIES), "FUSE_NOTIFY_")
# errno names for reply errors: Linux numbering, as the kernel puts them (negated) in fuse_out_header.error
ERRNO = Enum("ERRNO", tuple(sorted(((n, v) for v, n in _errno.errorcode.items()), key=lambda x: x[1])))

ENUMS = (OPCODE, NOTIFY_CODE, ERRNO, DIRENT_TYPE, LOCK_TYPE, WHENCE, EXT_TYPE, URING_CMD)

REGISTRY = Registry()
REGISTRY.add_structs(STRUCTS)
REGISTRY.add_flagsets(FLAGSETS)
REGISTRY.add_enums(ENUMS)

OPCODE_BY_VALUE = {o.value: o for o in OPCODES}
OPCODE_BY_NAME = {o.name: o for o in OPCODES}
NOTIFY_BY_VALUE = {n.value: n for n in NOTIFIES}
NOTIFY_BY_NAME = {n.name: n for n in NOTIFIES}

IN_HEADER_SIZE = REGISTRY.sizeof("fuse_in_header")
OUT_HEADER_SIZE = REGISTRY.sizeof("fuse_out_header")
DIRENT_NAME_OFFSET = REGISTRY.sizeof("fuse_dirent")
DIRENTPLUS_NAME_OFFSET = REGISTRY.sizeof("fuse_direntplus")

# /dev/fuse ioctls (linux/fuse.h "Device ioctls"), encoded as the kernel's _IOC(dir, type, nr, size).
DEV_IOC_MAGIC = 229
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | DEV_IOC_MAGIC << 8 | nr


DEV_IOC = Enum(
    "DEV_IOC",
    (
        # join the session of the fd given (a per-thread fd, as libfuse's clone_fd)
        ("FUSE_DEV_IOC_CLONE", _ioc(_IOC_READ, 0, 4)),
        # 7.40 passthrough: register a backing file (fuse_backing_map) -> backing_id for fuse_open_out
        ("FUSE_DEV_IOC_BACKING_OPEN", _ioc(_IOC_WRITE, 1, REGISTRY.sizeof("fuse_backing_map"))),
        ("FUSE_DEV_IOC_BACKING_CLOSE", _ioc(_IOC_WRITE, 2, 4)),  # the u32 backing_id
        ("FUSE_DEV_IOC_SYNC_INIT", _ioc(_IOC_NONE, 3, 0)),  # 7.45
    ),
)
# FILESYSTEM_MAX_STACK_DEPTH: the most fuse_init_out.max_stack_depth may be (the kernel ignores
# FUSE_PASSTHROUGH otherwise); a backing file's filesystem must be less deep than what was negotiated.
FILESYSTEM_MAX_STACK_DEPTH = 2


def dirent_align(x: int) -> int:
    """FUSE_DIRENT_ALIGN: records are padded to 8 bytes."""
    return (x + 7) & ~7
