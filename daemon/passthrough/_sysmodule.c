/* The passthrough filesystem's hot Linux syscalls without ctypes, and with the GIL released.
 *
 * Mechanics only: each function is one syscall (plus the packing of its result), named and shaped like
 * its pure-Python twin in syscalls.py (ctypes), which stays the reference; tests run both.  ctypes costs
 * a few microseconds per call (argument conversion, a libffi frame, a string buffer and a struct unpack
 * for statx), which is most of a LOOKUP's syscall time; here the GIL is also released while the kernel
 * works, so another queue or pool thread runs meanwhile.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structseq.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/fsuid.h>
#include <sys/ioctl.h>
#include <linux/capability.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#ifndef STATX_MNT_ID
#define STATX_MNT_ID 0x1000U
#endif
#define MAX_HANDLE_SZ_ 128

static PyTypeObject *StatxType;

static PyStructSequence_Field statx_fields[] = {
    {"st_mode", NULL}, {"st_ino", NULL}, {"st_dev", NULL}, {"mnt_id", NULL}, {"st_nlink", NULL},
    {"st_uid", NULL}, {"st_gid", NULL}, {"st_size", NULL}, {"st_blocks", NULL}, {"st_blksize", NULL},
    {"st_rdev", NULL}, {"st_atime_ns", NULL}, {"st_mtime_ns", NULL}, {"st_ctime_ns", NULL}, {NULL, NULL},
};

static PyStructSequence_Desc statx_desc = {
    "daemon.passthrough._sys.Statx",
    "The subset of struct statx the daemon needs, named like os.stat_result, plus mnt_id.",
    statx_fields, 14,
};

/* OSError(errno, "what: strerror", path) as the twin raises it. */
static PyObject *raise_errno(int err, const char *what, PyObject *path) {
    PyObject *msg = PyUnicode_FromFormat("%s: %s", what, strerror(err));
    if (msg == NULL) return NULL;
    PyObject *args = path != NULL ? Py_BuildValue("(iOO)", err, msg, path) : Py_BuildValue("(iO)", err, msg);
    Py_DECREF(msg);
    if (args == NULL) return NULL;
    PyObject *exc = PyObject_Call(PyExc_OSError, args, NULL);
    Py_DECREF(args);
    if (exc == NULL) return NULL;
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return NULL;
}

static inline long long ns(struct statx_timestamp t) { return (long long)t.tv_sec * 1000000000LL + t.tv_nsec; }

static int set_ll(PyObject *o, Py_ssize_t i, long long v) {
    PyObject *x = PyLong_FromLongLong(v);
    if (x == NULL) return -1;
    PyStructSequence_SET_ITEM(o, i, x);
    return 0;
}

static int set_ull(PyObject *o, Py_ssize_t i, unsigned long long v) {
    PyObject *x = PyLong_FromUnsignedLongLong(v);
    if (x == NULL) return -1;
    PyStructSequence_SET_ITEM(o, i, x);
    return 0;
}

/* statx(dirfd, path=b"", flags=AT_EMPTY_PATH|AT_SYMLINK_NOFOLLOW) -> Statx */
static PyObject *sys_statx(PyObject *self, PyObject *args) {
    int dirfd, flags = AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW;
    PyObject *path = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "i|Si:statx", &dirfd, &path, &flags)) return NULL;
    const char *p = path != NULL ? PyBytes_AS_STRING(path) : "";
    struct statx stx;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = statx(dirfd, p, flags, STATX_BASIC_STATS | STATX_MNT_ID, &stx);
    Py_END_ALLOW_THREADS
    if (rc != 0) return raise_errno(errno, "statx", path);
    PyObject *o = PyStructSequence_New(StatxType);
    if (o == NULL) return NULL;
    unsigned long long mnt_id = (stx.stx_mask & STATX_MNT_ID) ? stx.stx_mnt_id : 0; /* kernels before 5.8 */
    if (set_ull(o, 0, stx.stx_mode) || set_ull(o, 1, stx.stx_ino)
        || set_ull(o, 2, makedev(stx.stx_dev_major, stx.stx_dev_minor)) || set_ull(o, 3, mnt_id)
        || set_ull(o, 4, stx.stx_nlink) || set_ull(o, 5, stx.stx_uid) || set_ull(o, 6, stx.stx_gid)
        || set_ull(o, 7, stx.stx_size) || set_ull(o, 8, stx.stx_blocks) || set_ull(o, 9, stx.stx_blksize)
        || set_ull(o, 10, makedev(stx.stx_rdev_major, stx.stx_rdev_minor)) || set_ll(o, 11, ns(stx.stx_atime))
        || set_ll(o, 12, ns(stx.stx_mtime)) || set_ll(o, 13, ns(stx.stx_ctime))) {
        Py_DECREF(o);
        return NULL;
    }
    return o;
}

/* name_to_handle_at(dirfd, path=b"", flags=AT_EMPTY_PATH) -> (struct file_handle as bytes, mount_id) */
static PyObject *sys_name_to_handle_at(PyObject *self, PyObject *args) {
    int dirfd, flags = AT_EMPTY_PATH, mount_id = 0, rc;
    PyObject *path = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "i|Si:name_to_handle_at", &dirfd, &path, &flags)) return NULL;
    const char *p = path != NULL ? PyBytes_AS_STRING(path) : "";
    union {
        struct file_handle fh;
        unsigned char raw[sizeof(struct file_handle) + MAX_HANDLE_SZ_];
    } buf;
    buf.fh.handle_bytes = MAX_HANDLE_SZ_;
    Py_BEGIN_ALLOW_THREADS
    rc = name_to_handle_at(dirfd, p, &buf.fh, &mount_id, flags);
    Py_END_ALLOW_THREADS
    if (rc != 0) return raise_errno(errno, "name_to_handle_at", path);
    return Py_BuildValue("(y#i)", (const char *)buf.raw, (Py_ssize_t)(sizeof(struct file_handle) + buf.fh.handle_bytes),
                         mount_id);
}

/* open_by_handle_at(mount_fd, handle, flags) -> fd (O_CLOEXEC added) */
static PyObject *sys_open_by_handle_at(PyObject *self, PyObject *args) {
    int mount_fd, flags, fd;
    Py_buffer h;
    (void)self;
    if (!PyArg_ParseTuple(args, "iy*i:open_by_handle_at", &mount_fd, &h, &flags)) return NULL;
    if ((size_t)h.len < sizeof(struct file_handle)
        || ((struct file_handle *)h.buf)->handle_bytes > (size_t)h.len - sizeof(struct file_handle)) {
        PyBuffer_Release(&h);
        PyErr_SetString(PyExc_ValueError, "open_by_handle_at: a truncated struct file_handle");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    fd = open_by_handle_at(mount_fd, (struct file_handle *)h.buf, flags | O_CLOEXEC);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&h);
    if (fd < 0) return raise_errno(errno, "open_by_handle_at", NULL);
    return PyLong_FromLong(fd);
}

static PyObject *sys_renameat2(PyObject *self, PyObject *args) {
    int olddirfd, newdirfd, rc;
    unsigned int flags;
    PyObject *oldname, *newname;
    (void)self;
    if (!PyArg_ParseTuple(args, "iSiSI:renameat2", &olddirfd, &oldname, &newdirfd, &newname, &flags)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = renameat2(olddirfd, PyBytes_AS_STRING(oldname), newdirfd, PyBytes_AS_STRING(newname), flags);
    Py_END_ALLOW_THREADS
    if (rc != 0) return raise_errno(errno, "renameat2", oldname);
    Py_RETURN_NONE;
}

static PyObject *sys_syncfs(PyObject *self, PyObject *args) {
    int fd, rc;
    (void)self;
    if (!PyArg_ParseTuple(args, "i:syncfs", &fd)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = syncfs(fd);
    Py_END_ALLOW_THREADS
    if (rc != 0) return raise_errno(errno, "syncfs", NULL);
    Py_RETURN_NONE;
}

/* fchownat(fd, "", uid, gid, AT_EMPTY_PATH|AT_SYMLINK_NOFOLLOW); -1 leaves an id unchanged */
static PyObject *sys_fchown_empty(PyObject *self, PyObject *args) {
    int fd, rc;
    long long uid, gid;
    (void)self;
    if (!PyArg_ParseTuple(args, "iLL:fchown_empty", &fd, &uid, &gid)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = fchownat(fd, "", (uid_t)(uid & 0xFFFFFFFF), (gid_t)(gid & 0xFFFFFFFF), AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW);
    Py_END_ALLOW_THREADS
    if (rc != 0) return raise_errno(errno, "fchownat", NULL);
    Py_RETURN_NONE;
}

/* readlinkat(fd, "") on an O_PATH fd of a symlink */
static PyObject *sys_readlink_empty(PyObject *self, PyObject *args) {
    int fd;
    ssize_t n;
    char buf[4097];
    (void)self;
    if (!PyArg_ParseTuple(args, "i:readlink_empty", &fd)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    n = readlinkat(fd, "", buf, sizeof buf);
    Py_END_ALLOW_THREADS
    if (n < 0) return raise_errno(errno, "readlinkat", NULL);
    return PyBytes_FromStringAndSize(buf, n);
}

static PyObject *sys_fallocate(PyObject *self, PyObject *args) {
    int fd, mode, rc;
    long long offset, length;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiLL:fallocate", &fd, &mode, &offset, &length)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = fallocate(fd, mode, (off_t)offset, (off_t)length);
    Py_END_ALLOW_THREADS
    if (rc != 0) return raise_errno(errno, "fallocate", NULL);
    Py_RETURN_NONE;
}

/* Per-thread credentials: raw syscalls, so glibc does not broadcast them to every thread. */
static PyObject *sys_setfsuid(PyObject *self, PyObject *args) {
    unsigned int id;
    (void)self;
    if (!PyArg_ParseTuple(args, "I:setfsuid", &id)) return NULL;
    return PyLong_FromLong(setfsuid(id));
}

static PyObject *sys_setfsgid(PyObject *self, PyObject *args) {
    unsigned int id;
    (void)self;
    if (!PyArg_ParseTuple(args, "I:setfsgid", &id)) return NULL;
    return PyLong_FromLong(setfsgid(id));
}

#define MAX_GROUPS 65536

/* This thread's supplementary groups only (glibc's setgroups() changes every thread). */
static PyObject *sys_setgroups_thread(PyObject *self, PyObject *arg) {
    (void)self;
    PyObject *seq = PySequence_Fast(arg, "setgroups_thread: a sequence of gids");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_GROUPS) {
        Py_DECREF(seq);
        return raise_errno(EINVAL, "setgroups", NULL);
    }
    gid_t small[32];
    gid_t *g = n <= 32 ? small : PyMem_New(gid_t, n);
    if (g == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long v = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == (unsigned long)-1 && PyErr_Occurred()) {
            if (g != small) PyMem_Free(g);
            Py_DECREF(seq);
            return NULL;
        }
        g[i] = (gid_t)v;
    }
    Py_DECREF(seq);
    long rc = syscall(SYS_setgroups, (size_t)n, g);
    int err = errno;
    if (g != small) PyMem_Free(g);
    if (rc != 0) return raise_errno(err, "setgroups", NULL);
    Py_RETURN_NONE;
}

/* wait_kick(kick_fd, wake_fd) -> mask: block (GIL released) until either eventfd is readable, read the
 * ready ones (their counts are not needed: kicks coalesce), and return 1 for a kick, 2 for a wake-up, or
 * both.  A vhost-user queue thread's wait: one call instead of poll() plus a read per ready fd. */
static PyObject *sys_wait_kick(PyObject *self, PyObject *args) {
    int kick_fd, wake_fd, rc, mask = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "ii:wait_kick", &kick_fd, &wake_fd)) return NULL;
    struct pollfd p[2] = {{.fd = wake_fd, .events = POLLIN}, {.fd = kick_fd, .events = POLLIN}};
    Py_BEGIN_ALLOW_THREADS
    do {
        rc = poll(p, kick_fd >= 0 ? 2 : 1, -1);
    } while (rc < 0 && errno == EINTR);
    if (rc > 0 && ((p[0].revents | (kick_fd >= 0 ? p[1].revents : 0)) & POLLNVAL)) {
        rc = -1; /* a closed fd: an error, not a wake-up that would repeat forever */
        errno = EBADF;
    } else if (rc > 0) {
        eventfd_t v;
        if (p[0].revents) {
            mask |= 2;
            if (p[0].revents & POLLIN) (void)eventfd_read(wake_fd, &v);
        }
        if (kick_fd >= 0 && p[1].revents) {
            mask |= 1;
            if (p[1].revents & POLLIN) (void)eventfd_read(kick_fd, &v);
        }
    }
    Py_END_ALLOW_THREADS
    if (rc < 0) return raise_errno(errno, "poll", NULL);
    return PyLong_FromLong(mask);
}

/* Raise (on) or lower capability `cap` in this thread's effective set: 1 if it changed, 0 if it already
 * was so, -errno on failure. */
static int effective_cap(int cap, int on) {
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &hdr, data) != 0) return -errno;
    uint32_t bit = 1u << (cap % 32);
    if (!(data[cap / 32].effective & bit) == !on) return 0;
    if (on) data[cap / 32].effective |= bit;
    else data[cap / 32].effective &= ~bit;
    return syscall(SYS_capset, &hdr, data) != 0 ? -errno : 1;
}

/* ioctl_cap(fd, request, arg bytes, cap) -> the ioctl's return value: ioctl(fd, request, copy of arg)
 * with capability `cap` raised in the effective set for that call only (cap < 0: as it is), then as it
 * was.  FUSE's backing-file ioctls need CAP_SYS_ADMIN, which the sandboxed threads keep permitted, not
 * effective. */
static PyObject *sys_ioctl_cap(PyObject *self, PyObject *args) {
    int fd, cap, rc, err = 0;
    const char *what = "ioctl";
    unsigned long request;
    Py_buffer arg;
    char buf[256];
    (void)self;
    if (!PyArg_ParseTuple(args, "iky*i:ioctl_cap", &fd, &request, &arg, &cap)) return NULL;
    if (arg.len > (Py_ssize_t)sizeof(buf) || cap >= 64) {
        PyBuffer_Release(&arg);
        PyErr_SetString(PyExc_ValueError, "ioctl_cap: argument over 256 bytes or capability over 63");
        return NULL;
    }
    memcpy(buf, arg.buf, (size_t)arg.len);
    PyBuffer_Release(&arg);
    Py_BEGIN_ALLOW_THREADS
    int raised = cap >= 0 ? effective_cap(cap, 1) : 0;
    if (raised >= 0) {
        rc = ioctl(fd, request, buf);
        err = rc < 0 ? errno : 0;
        if (raised) (void)effective_cap(cap, 0);
    } else {
        err = -raised;
        rc = -1;
        what = "capset";
    }
    Py_END_ALLOW_THREADS
    if (rc < 0) return raise_errno(err, what, NULL);
    return PyLong_FromLong(rc);
}

static PyMethodDef methods[] = {
    {"wait_kick", sys_wait_kick, METH_VARARGS, "wait_kick(kick_fd, wake_fd) -> 1 kick | 2 wake-up"},
    {"statx", sys_statx, METH_VARARGS, "statx(dirfd, path=b'', flags=AT_EMPTY_PATH|AT_SYMLINK_NOFOLLOW) -> Statx"},
    {"name_to_handle_at", sys_name_to_handle_at, METH_VARARGS,
     "name_to_handle_at(dirfd, path=b'', flags=AT_EMPTY_PATH) -> (handle bytes, mount_id)"},
    {"open_by_handle_at", sys_open_by_handle_at, METH_VARARGS, "open_by_handle_at(mount_fd, handle, flags) -> fd"},
    {"renameat2", sys_renameat2, METH_VARARGS, "renameat2(olddirfd, oldname, newdirfd, newname, flags)"},
    {"syncfs", sys_syncfs, METH_VARARGS, "syncfs(fd)"},
    {"fchown_empty", sys_fchown_empty, METH_VARARGS, "fchownat(fd, '', uid, gid, AT_EMPTY_PATH)"},
    {"readlink_empty", sys_readlink_empty, METH_VARARGS, "readlinkat(fd, '') -> bytes"},
    {"fallocate", sys_fallocate, METH_VARARGS, "fallocate(fd, mode, offset, length)"},
    {"setfsuid", sys_setfsuid, METH_VARARGS, "setfsuid(uid) -> previous fsuid (this thread)"},
    {"setfsgid", sys_setfsgid, METH_VARARGS, "setfsgid(gid) -> previous fsgid (this thread)"},
    {"setgroups_thread", sys_setgroups_thread, METH_O, "setgroups_thread(gids): this thread's groups only"},
    {"ioctl_cap", sys_ioctl_cap, METH_VARARGS, "ioctl_cap(fd, request, arg, cap) -> ioctl's value, cap raised"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "daemon.passthrough._sys",
    "The passthrough filesystem's hot syscalls, GIL released (twin: syscalls.py over ctypes).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sys(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    StatxType = PyStructSequence_NewType(&statx_desc);
    if (StatxType == NULL || PyModule_AddObject(m, "Statx", (PyObject *)StatxType) < 0) {
        Py_XDECREF(StatxType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(StatxType);
    return m;
}
