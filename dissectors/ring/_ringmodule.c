/*
 * dissectors.ring._ring: the thin CPython binding over ring_core.c.
 *
 * Objects own their C structs; Python references keep guest memory alive: a region holds the buffer
 * export of its mapping (so mmap.close() fails while it is in use), and every writable memoryview a
 * Chain hands out holds its region.  The GIL is released around everything that may block: stopping
 * or draining a path, swapping its fds, and waiting for captures.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stddef.h>
#include <malloc.h>
#include <errno.h>
#include <poll.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "ring_core.h"
#include "ring_answer.h"

static PyObject *RingError;   /* dissectors.ring._common.RingError */
static PyObject *CaptureType; /* dissectors.ring._common.Capture */
static PyObject *KindNames[4];
static void wpool_clear(void); /* chain view pool (below) */

static PyObject *ring_error(int err, int head, PyObject *chains)
{
    if (err < 0)
        err = -err;
    PyObject *h = head >= 0 ? PyLong_FromLong(head) : Py_NewRef(Py_None);
    PyObject *exc = PyObject_CallFunction(RingError, "sOO", rc_err_name(err), h, chains ? chains : Py_None);
    Py_XDECREF(h);
    if (exc) {
        PyErr_SetObject(RingError, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* ================================================================== _Region: keeps a mapping alive */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    PyObject *mv; /* memoryview (format B) of the whole buffer: chain views share its managed buffer */
} RegionObject;

static void Region_dealloc(RegionObject *self)
{
    Py_XDECREF(self->mv);
    if (self->has_view)
        PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject RegionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dissectors.ring._ring._Region",
    .tp_basicsize = sizeof(RegionObject),
    .tp_dealloc = (destructor)Region_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Holds the buffer export of one mapped region.",
};

/* ================================================================== _Seg: exporter for one segment */

typedef struct {
    PyObject_HEAD
    PyObject *owner; /* RegionObject */
    uint8_t *ptr;
    Py_ssize_t len;
    int readonly;
} SegObject;

static int Seg_getbuffer(SegObject *self, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)self, self->ptr, self->len, self->readonly, flags);
}

static void Seg_dealloc(SegObject *self)
{
    Py_XDECREF(self->owner);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyBufferProcs Seg_as_buffer = {(getbufferproc)Seg_getbuffer, NULL};

static PyTypeObject SegType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dissectors.ring._ring._Seg",
    .tp_basicsize = sizeof(SegObject),
    .tp_dealloc = (destructor)Seg_dealloc,
    .tp_as_buffer = &Seg_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
};

static PyObject *make_view(PyObject *owner, uint8_t *ptr, Py_ssize_t len, int readonly)
{
#ifndef Py_LIMITED_API
    /* Fast path: one object.  A view of the region's memoryview shares its managed buffer (which holds
     * the export of the mapping), then is narrowed to [ptr, ptr+len) exactly as memoryview slicing
     * does internally; a 1-D byte view stays C-contiguous, so its flags remain valid. */
    RegionObject *reg = (RegionObject *)owner;
    PyObject *mv = PyMemoryView_FromObject(reg->mv);
    if (!mv)
        return NULL;
    PyMemoryViewObject *m = (PyMemoryViewObject *)mv;
    m->view.buf = ptr;
    m->view.len = len;
    m->view.shape[0] = len;
    m->view.readonly = m->view.readonly || readonly;
    return mv;
#else
    SegObject *s = PyObject_New(SegObject, &SegType);
    if (!s)
        return NULL;
    s->owner = Py_NewRef(owner);
    s->ptr = ptr;
    s->len = len;
    s->readonly = readonly;
    PyObject *mv = PyMemoryView_FromObject((PyObject *)s);
    Py_DECREF(s);
    return mv;
#endif
}

/* ================================================================== MemoryMap */

typedef struct {
    PyObject_HEAD
    struct rc_memmap m;
    PyObject *owners[RC_MAX_REGIONS]; /* RegionObject per slot, parallel to m.r */
    int busy;                         /* running shadow paths: regions must not move under them */
} MemoryMapObject;

static int MemoryMap_init(MemoryMapObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "", kwlist))
        return -1;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "memory map in use by a running shadow path: stop it first");
        return -1;
    }
    for (int i = 0; i < self->m.n; i++)
        Py_CLEAR(self->owners[i]);
    rc_mem_init(&self->m);
    return 0;
}

static void MemoryMap_dealloc(MemoryMapObject *self)
{
    wpool_clear(); /* pooled views pin region exports */
    for (int i = 0; i < self->m.n; i++)
        Py_CLEAR(self->owners[i]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *MemoryMap_add_region(MemoryMapObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"gpa", "size", "buf", "uva", "mmap_offset", NULL};
    unsigned long long gpa, size, uva = 0, mmap_offset = 0;
    PyObject *buf;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KKO|KK", kwlist, &gpa, &size, &buf, &uva, &mmap_offset))
        return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "memory map in use by a running shadow path: stop it first");
        return NULL;
    }
    RegionObject *reg = PyObject_New(RegionObject, &RegionType);
    if (!reg)
        return NULL;
    reg->has_view = 0;
    reg->mv = NULL;
    if (PyObject_GetBuffer(buf, &reg->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        Py_DECREF(reg);
        return NULL;
    }
    reg->has_view = 1;
    PyObject *whole = PyMemoryView_FromObject(buf);
    if (!whole) {
        Py_DECREF(reg);
        return NULL;
    }
    reg->mv = PyObject_CallMethod(whole, "cast", "s", "B");
    Py_DECREF(whole);
    if (!reg->mv) {
        Py_DECREF(reg);
        return NULL;
    }
    if (mmap_offset + size < mmap_offset || (unsigned long long)reg->view.len < mmap_offset + size) {
        Py_DECREF(reg);
        PyErr_Format(PyExc_ValueError, "buffer of %zd bytes cannot hold mmap_offset %llu + size %llu",
                     reg->view.len, mmap_offset, size);
        return NULL;
    }
    int i = rc_mem_add(&self->m, gpa, size, uva, (uint8_t *)reg->view.buf + mmap_offset);
    if (i < 0) {
        Py_DECREF(reg);
        return ring_error(i, -1, NULL);
    }
    self->owners[i] = (PyObject *)reg;
    return PyLong_FromLong(i);
}

static PyObject *MemoryMap_remove_region(MemoryMapObject *self, PyObject *arg)
{
    unsigned long long gpa = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "memory map in use by a running shadow path: stop it first");
        return NULL;
    }
    int i = rc_mem_remove(&self->m, gpa);
    if (i < 0)
        return ring_error(i, -1, NULL);
    wpool_clear(); /* pooled views may pin this region's export */
    PyObject *old = self->owners[i];
    memmove(&self->owners[i], &self->owners[i + 1], (size_t)(self->m.n - i) * sizeof(PyObject *));
    self->owners[self->m.n] = NULL;
    Py_DECREF(old);
    Py_RETURN_NONE;
}

static PyObject *MemoryMap_translate(MemoryMapObject *self, PyObject *args)
{
    unsigned long long gpa, len = 1;
    if (!PyArg_ParseTuple(args, "K|K", &gpa, &len))
        return NULL;
    uint64_t off;
    int i = rc_mem_find(&self->m, gpa, len, &off);
    if (i < 0)
        return ring_error(i, -1, NULL);
    return Py_BuildValue("iK", i, (unsigned long long)off);
}

static PyObject *MemoryMap_uva_to_gpa(MemoryMapObject *self, PyObject *arg)
{
    unsigned long long uva = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    uint64_t gpa;
    int i = rc_mem_uva_to_gpa(&self->m, uva, &gpa);
    if (i < 0)
        return ring_error(i, -1, NULL);
    return PyLong_FromUnsignedLongLong(gpa);
}

static PyObject *MemoryMap_view(MemoryMapObject *self, PyObject *args)
{
    unsigned long long gpa, len;
    if (!PyArg_ParseTuple(args, "KK", &gpa, &len))
        return NULL;
    uint64_t off;
    int i = rc_mem_find(&self->m, gpa, len, &off);
    if (i < 0)
        return ring_error(i, -1, NULL);
    if (len > PY_SSIZE_T_MAX)
        return ring_error(RC_E_OVERFLOW, -1, NULL);
    return make_view(self->owners[i], self->m.r[i].host + off, (Py_ssize_t)len, 0);
}

static PyObject *MemoryMap_regions(MemoryMapObject *self, void *closure)
{
    (void)closure;
    PyObject *l = PyList_New(self->m.n);
    if (!l)
        return NULL;
    for (int i = 0; i < self->m.n; i++) {
        PyObject *t = Py_BuildValue("KKK", (unsigned long long)self->m.r[i].gpa,
                                    (unsigned long long)self->m.r[i].size, (unsigned long long)self->m.r[i].uva);
        if (!t) {
            Py_DECREF(l);
            return NULL;
        }
        PyList_SET_ITEM(l, i, t);
    }
    return l;
}

static PyMethodDef MemoryMap_methods[] = {
    {"add_region", (PyCFunction)(void (*)(void))MemoryMap_add_region, METH_VARARGS | METH_KEYWORDS,
     "add_region(gpa, size, buf, uva=0, mmap_offset=0) -> slot"},
    {"remove_region", (PyCFunction)MemoryMap_remove_region, METH_O, "remove_region(gpa)"},
    {"translate", (PyCFunction)MemoryMap_translate, METH_VARARGS, "translate(gpa, length=1) -> (slot, offset)"},
    {"uva_to_gpa", (PyCFunction)MemoryMap_uva_to_gpa, METH_O, "uva_to_gpa(uva) -> gpa"},
    {"view", (PyCFunction)MemoryMap_view, METH_VARARGS, "view(gpa, length) -> writable memoryview"},
    {NULL},
};
static PyGetSetDef MemoryMap_getset[] = {
    {"regions", (getter)MemoryMap_regions, NULL, "[(gpa, size, uva)]", NULL},
    {NULL},
};

static PyTypeObject MemoryMapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dissectors.ring._ring.MemoryMap",
    .tp_basicsize = sizeof(MemoryMapObject),
    .tp_dealloc = (destructor)MemoryMap_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Guest memory regions with GPA -> host translation and bounds checks.",
    .tp_methods = MemoryMap_methods,
    .tp_getset = MemoryMap_getset,
    .tp_init = (initproc)MemoryMap_init,
    .tp_new = PyType_GenericNew,
};

/* ================================================================== gather buffers
 * A popped chain's readable bytes are mostly dropped with the chain, and the next batch asks for the
 * same size again (a daemon's WRITEs, a benchmark's payloads).  A bytes object nobody else references
 * is still exclusively ours, so it is recycled like CPython's own free lists: no malloc/free pair per
 * chain.  One size class at a time, bounded in count and bytes. */
#define POOL_MAX 1024
#define POOL_MIN_SIZE 1024
#define POOL_MAX_BYTES (16u << 20)
#if !defined(Py_LIMITED_API) && !defined(Py_GIL_DISABLED) && PY_VERSION_HEX < 0x030E0000
#define POOL_ENABLED 1 /* needs PyBytesObject's cached hash field, and the GIL around the pools */
#endif
static PyObject *pool[POOL_MAX];
static int pool_n;
#ifdef POOL_ENABLED
static Py_ssize_t pool_size;
#endif

static PyObject *gather_bytes(Py_ssize_t n)
{
#ifdef POOL_ENABLED
    while (n == pool_size && pool_n > 0) {
        PyObject *b = pool[--pool_n];
        if (Py_REFCNT(b) != 1) { /* somebody found it meanwhile: it is theirs now */
            Py_DECREF(b);
            continue;
        }
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
        ((PyBytesObject *)b)->ob_shash = -1; /* contents change: forget a cached hash */
#pragma GCC diagnostic pop
        return b;
    }
#endif
    return PyBytes_FromStringAndSize(NULL, n);
}

static void pool_clear(void)
{
    while (pool_n > 0)
        Py_DECREF(pool[--pool_n]);
}

static void release_bytes(PyObject *b)
{
#ifdef POOL_ENABLED
    if (b && Py_REFCNT(b) == 1 && PyBytes_CheckExact(b)) {
        Py_ssize_t n = PyBytes_GET_SIZE(b);
        if (n >= POOL_MIN_SIZE && (size_t)n <= POOL_MAX_BYTES) {
            if (n != pool_size) {
                pool_clear();
                pool_size = n;
            }
            if (pool_n < POOL_MAX && (size_t)n * (size_t)(pool_n + 1) <= POOL_MAX_BYTES) {
                pool[pool_n++] = b;
                return;
            }
        }
    }
#endif
    Py_XDECREF(b);
}

/* The same for a chain's `writable` tuple: when nothing but the chain holds the tuple and its views, the
 * next chain with as many writable segments in the same regions gets it back, each view re-pointed as
 * make_view() narrows a fresh one.  Pooled views pin their region's export, so removing a region or
 * dropping a memory map empties the pool first. */
static PyObject *wpool[POOL_MAX];
static int wpool_n;

static void wpool_clear(void)
{
    while (wpool_n > 0)
        Py_DECREF(wpool[--wpool_n]);
}

#ifdef POOL_ENABLED
static int view_reusable(PyObject *v)
{
    PyMemoryViewObject *m = (PyMemoryViewObject *)v;
    return Py_REFCNT(v) == 1 && Py_IS_TYPE(v, &PyMemoryView_Type) && m->exports == 0 &&
           !(m->flags & _Py_MEMORYVIEW_RELEASED) && m->view.ndim == 1;
}
#endif

static void release_writable(PyObject *t)
{
#ifdef POOL_ENABLED
    if (t && Py_REFCNT(t) == 1 && PyTuple_CheckExact(t) && PyTuple_GET_SIZE(t) > 0 && wpool_n < POOL_MAX) {
        Py_ssize_t n = PyTuple_GET_SIZE(t), i = 0;
        while (i < n && view_reusable(PyTuple_GET_ITEM(t, i)))
            i++;
        if (i == n) {
            wpool[wpool_n++] = t;
            return;
        }
    }
#endif
    Py_XDECREF(t);
}

/* ================================================================== Chain */

#define CHAIN_INLINE_LAYOUT 4
typedef struct {
    PyObject_HEAD
    int head;
    PyObject *readable; /* bytes */
    PyObject *writable; /* tuple of memoryview */
    uint32_t nlayout;
    struct rc_layout *layout;
    struct rc_layout inl[CHAIN_INLINE_LAYOUT];
    unsigned long long readable_len, writable_len;
    PyObject *queue; /* the SplitQueue that popped it: completions go there */
    char done;       /* completed (reply() or complete()): a second completion is refused */
} ChainObject;

static int queue_complete(PyObject *queue, ChainObject *c, uint32_t len, int truncated);

static void Chain_dealloc(ChainObject *self)
{
    /* Views into the pool first, then the queue: if it held the last reference to the memory map, the
     * map's dealloc empties the pool, these views included (pooled after it, they would pin the guest
     * mapping until some later map went). */
    release_bytes(self->readable);
    release_writable(self->writable);
    Py_XDECREF(self->queue);
    if (self->layout != self->inl)
        PyMem_Free(self->layout);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Chain_layout(ChainObject *self, void *closure)
{
    (void)closure;
    PyObject *t = PyTuple_New(self->nlayout);
    if (!t)
        return NULL;
    for (uint32_t i = 0; i < self->nlayout; i++) {
        PyObject *e = Py_BuildValue("KIH", (unsigned long long)self->layout[i].addr, self->layout[i].len,
                                    self->layout[i].flags);
        if (!e) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, e);
    }
    return t;
}

/* Scatter bytes into the writable segments; returns how many fitted.  Saves a Python loop per reply. */
static PyObject *Chain_write(ChainObject *self, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t done = 0, n = PyTuple_GET_SIZE(self->writable);
    for (Py_ssize_t i = 0; i < n && done < b.len; i++) {
        /* through the buffer protocol, not the view's struct: a view the caller released fails here
         * instead of being written through */
        Py_buffer v;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(self->writable, i), &v, PyBUF_WRITABLE) < 0) {
            PyBuffer_Release(&b);
            return NULL;
        }
        Py_ssize_t k = v.len < b.len - done ? v.len : b.len - done;
        memcpy(v.buf, (const char *)b.buf + done, (size_t)k);
        PyBuffer_Release(&v);
        done += k;
    }
    PyBuffer_Release(&b);
    return PyLong_FromSsize_t(done);
}

/* Copy len bytes into the writable segments from segment *si, offset *so on (or only skip them when src
 * is NULL: bytes already written in place); returns how many fitted. */
static Py_ssize_t scatter_at(ChainObject *self, Py_ssize_t *si, Py_ssize_t *so, const char *src, Py_ssize_t len)
{
    Py_ssize_t done = 0, n = PyTuple_GET_SIZE(self->writable);
    while (*si < n && done < len) {
        Py_buffer v;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(self->writable, *si), &v, PyBUF_WRITABLE) < 0)
            return -1;
        Py_ssize_t seglen = v.len, room = seglen - *so, k = room < len - done ? room : len - done;
        if (src && k > 0)
            memcpy((char *)v.buf + *so, src + done, (size_t)k);
        PyBuffer_Release(&v);
        done += k;
        *so += k;
        if (*so >= seglen) { /* this segment is full: on to the next */
            (*si)++;
            *so = 0;
        }
    }
    return done;
}

static int check_open(ChainObject *self)
{
    if (self->done) {
        PyErr_Format(PyExc_ValueError, "chain %d was already completed", self->head);
        return -1;
    }
    if (!self->queue) {
        PyErr_SetString(PyExc_ValueError, "chain has no queue to complete on");
        return -1;
    }
    return 0;
}

/* The reply sink of a request: scatter the parts, then complete the chain with the bytes written. */
static PyObject *Chain_reply(ChainObject *self, PyObject *arg)
{
    if (check_open(self) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(arg, "reply() takes a sequence of buffers");
    if (!seq)
        return NULL;
    Py_ssize_t si = 0, so = 0, written = 0, n = PySequence_Fast_GET_SIZE(seq);
    int truncated = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *part = items[i];
        Py_ssize_t want, got;
        if (PyObject_CheckBuffer(part)) {
            Py_buffer b;
            if (PyObject_GetBuffer(part, &b, PyBUF_SIMPLE) < 0)
                goto fail;
            want = b.len;
            got = scatter_at(self, &si, &so, b.buf, b.len);
            PyBuffer_Release(&b);
        } else { /* a length already written in place (the daemon's zero-copy READ) */
            want = PyObject_Length(part);
            if (want < 0)
                goto fail;
            got = scatter_at(self, &si, &so, NULL, want);
        }
        if (got < 0)
            goto fail;
        written += got;
        truncated |= got < want;
    }
    Py_DECREF(seq);
    if (written > 0xffffffffLL) {
        PyErr_SetString(PyExc_OverflowError, "reply longer than a used length");
        return NULL;
    }
    if (queue_complete(self->queue, self, (uint32_t)written, truncated) < 0)
        return NULL;
    return PyLong_FromSsize_t(written);
fail:
    Py_DECREF(seq);
    return NULL;
}

static PyObject *Chain_complete(ChainObject *self, PyObject *args)
{
    unsigned int len = 0;
    if (!PyArg_ParseTuple(args, "|I", &len))
        return NULL;
    if (check_open(self) < 0 || queue_complete(self->queue, self, len, 0) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMemberDef Chain_members[] = {
    {"head", T_INT, offsetof(ChainObject, head), READONLY, "descriptor index of the chain head"},
    {"readable", T_OBJECT, offsetof(ChainObject, readable), READONLY, "the device-readable bytes, gathered"},
    {"writable", T_OBJECT, offsetof(ChainObject, writable), READONLY, "device-writable segments (memoryviews)"},
    {"readable_len", T_ULONGLONG, offsetof(ChainObject, readable_len), READONLY, NULL},
    {"writable_len", T_ULONGLONG, offsetof(ChainObject, writable_len), READONLY, NULL},
    {"done", T_BOOL, offsetof(ChainObject, done), READONLY, "completed (reply() or complete())"},
    {NULL},
};
static PyGetSetDef Chain_getset[] = {
    {"layout", (getter)Chain_layout, NULL, "((addr, len, flags), ...) effective descriptors", NULL},
    {NULL},
};
static PyMethodDef Chain_methods[] = {
    {"write", (PyCFunction)Chain_write, METH_O, "write(data) -> bytes written into the writable segments"},
    {"reply", (PyCFunction)Chain_reply, METH_O,
     "reply(parts) -> n: scatter the buffers (a non-buffer part: that many bytes already in place), then complete"},
    {"complete", (PyCFunction)Chain_complete, METH_VARARGS, "complete(len=0): put the chain on the used ring"},
    {NULL},
};

static PyTypeObject ChainType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dissectors.ring._ring.Chain",
    .tp_basicsize = sizeof(ChainObject),
    .tp_dealloc = (destructor)Chain_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One popped descriptor chain.",
    .tp_members = Chain_members,
    .tp_getset = Chain_getset,
    .tp_methods = Chain_methods,
};

/* A pooled writable tuple re-pointed at this chain's segments, or NULL (then build a new one). */
static PyObject *reuse_writable(MemoryMapObject *mm, const struct rc_chain *c, Py_ssize_t nw)
{
#ifdef POOL_ENABLED
    if (wpool_n == 0 || nw == 0)
        return NULL;
    PyObject *t = wpool[wpool_n - 1];
    if (PyTuple_GET_SIZE(t) != nw)
        return NULL;
    Py_ssize_t k = 0;
    for (uint32_t i = 0; i < c->nseg; i++) { /* every view must share its segment's region buffer */
        if (!c->seg[i].write)
            continue;
        PyObject *v = PyTuple_GET_ITEM(t, k++);
        PyMemoryViewObject *reg_mv = (PyMemoryViewObject *)((RegionObject *)mm->owners[c->seg[i].region])->mv;
        if (((PyMemoryViewObject *)v)->mbuf != reg_mv->mbuf)
            return NULL;
        if (!view_reusable(v) || Py_REFCNT(t) != 1) { /* found meanwhile (gc.get_objects()): let it go */
            wpool_n--;
            Py_DECREF(t);
            return NULL;
        }
    }
    wpool_n--;
    k = 0;
    for (uint32_t i = 0; i < c->nseg; i++) {
        if (!c->seg[i].write)
            continue;
        PyMemoryViewObject *reg_mv = (PyMemoryViewObject *)((RegionObject *)mm->owners[c->seg[i].region])->mv;
        PyMemoryViewObject *m = (PyMemoryViewObject *)PyTuple_GET_ITEM(t, k++);
        m->view.buf = c->seg[i].host;
        m->view.len = c->seg[i].len;
        m->view.shape[0] = c->seg[i].len;
        m->view.readonly = reg_mv->view.readonly;
        m->hash = -1;
    }
    return t;
#else
    (void)mm, (void)c, (void)nw;
    return NULL;
#endif
}

/* A Chain for the walked chain `c` whose readable bytes are `readable` (a bytes object; the reference is
 * taken over, even on failure). */
static PyObject *chain_with(MemoryMapObject *mm, const struct rc_chain *c, PyObject *queue, PyObject *readable)
{
    ChainObject *o = PyObject_New(ChainObject, &ChainType);
    if (!o) {
        release_bytes(readable);
        return NULL;
    }
    o->queue = Py_XNewRef(queue);
    o->done = 0;
    o->head = c->head;
    o->readable = readable;
    o->writable = NULL;
    o->nlayout = c->nlayout;
    o->layout = o->inl;
    o->readable_len = c->readable_len;
    o->writable_len = c->writable_len;
    if (c->nlayout > CHAIN_INLINE_LAYOUT) {
        o->layout = PyMem_Malloc(c->nlayout * sizeof(struct rc_layout));
        if (!o->layout) {
            o->layout = o->inl;
            Py_DECREF(o);
            return PyErr_NoMemory();
        }
    }
    memcpy(o->layout, c->layout, c->nlayout * sizeof(struct rc_layout));
    Py_ssize_t nw = 0;
    for (uint32_t i = 0; i < c->nseg; i++)
        nw += c->seg[i].write;
    if ((o->writable = reuse_writable(mm, c, nw)))
        return (PyObject *)o;
    o->writable = PyTuple_New(nw); /* a tuple: one allocation (a list takes two) */
    if (!o->writable) {
        Py_DECREF(o);
        return NULL;
    }
    Py_ssize_t k = 0;
    for (uint32_t i = 0; i < c->nseg; i++) {
        if (!c->seg[i].write)
            continue;
        PyObject *mv = make_view(mm->owners[c->seg[i].region], c->seg[i].host, c->seg[i].len, 0);
        if (!mv) {
            Py_DECREF(o);
            return NULL;
        }
        PyTuple_SET_ITEM(o->writable, k++, mv);
    }
    return (PyObject *)o;
}

/* The chain's readable bytes, gathered into a bytes object (pooled). */
static PyObject *readable_bytes(const struct rc_chain *c)
{
    if (c->readable_len > PY_SSIZE_T_MAX / 2)
        return ring_error(RC_E_OVERFLOW, c->head, NULL);
    PyObject *b = gather_bytes((Py_ssize_t)c->readable_len);
    if (b)
        rc_chain_gather(c, (uint8_t *)PyBytes_AS_STRING(b), c->readable_len);
    return b;
}

static PyObject *chain_to_python(MemoryMapObject *mm, const struct rc_chain *c, PyObject *queue)
{
    PyObject *readable = readable_bytes(c);
    return readable ? chain_with(mm, c, queue, readable) : NULL;
}

/* ================================================================== SplitQueue */

typedef struct {
    PyObject_HEAD
    MemoryMapObject *mem;
    PyObject *ring_owners; /* tuple of regions holding the rings */
    struct rc_queue q;
    struct rc_chain chain;
    /* Completions.  Every call below runs with the GIL held from the used-ring write to the call fd's
     * write, so completions from several threads are serialised, and a call fd swapped by Python (then
     * closed) is never written after the swap. */
    int call_fd;                       /* -1: none */
    int detached;                      /* detach(): completions are dropped (counted as late) */
    int batch_open;
    unsigned long batch_owner;         /* the thread between begin_batch() and end_batch() */
    struct rc_vring_used_elem *batch;  /* num entries */
    uint32_t nbatch;
    Py_ssize_t inflight;               /* popped chains not completed yet */
    PyObject *next;                    /* handover(): the queue that took this one's place */
    uint32_t pending;                  /* serve_fast(): entries of the open batch's group not popped yet */
    unsigned long long calls, suppressed, completed, late, truncated, truncated_seen, popped;
} SplitQueueObject;

/* Publish entries (one used->idx store), then call the driver unless it asked for no call. */
static int queue_publish(SplitQueueObject *q, const struct rc_vring_used_elem *e, uint32_t n)
{
    int call;
    int err = rc_queue_publish(&q->q, e, n, &call);
    if (err) {
        ring_error(err, n == 1 ? (int)e[0].id : -1, NULL);
        return -1;
    }
    if (n == 0)
        return 0;
    if (!call) {
        q->suppressed++;
    } else if (q->call_fd >= 0) {
        uint64_t one = 1;
        ssize_t r = write(q->call_fd, &one, sizeof(one)); /* a dropped fd: the next SET_VRING_CALL replaces it */
        (void)r;
        q->calls++;
    }
    return 0;
}

static int queue_flush(SplitQueueObject *q)
{
    uint32_t n = q->nbatch;
    q->nbatch = 0;
    return queue_publish(q, q->batch, n);
}

static int queue_add(SplitQueueObject *q, uint32_t head, uint32_t len)
{
    if (q->detached) {
        q->late++;
        return 0;
    }
    struct rc_vring_used_elem e = {head, len};
    if (q->batch_open && q->batch_owner == PyThread_get_thread_ident()) {
        if (q->nbatch >= q->q.num && queue_flush(q) < 0) /* a guest that offered a head twice */
            return -1;
        q->batch[q->nbatch++] = e;
        return 0;
    }
    return queue_publish(q, &e, 1);
}

static int queue_complete_head(SplitQueueObject *q, int head, uint32_t len, int truncated)
{
    while (q->next) /* the ring was re-made (SET_MEM_TABLE, SET_VRING_ADDR) while this chain was served */
        q = (SplitQueueObject *)q->next;
    q->inflight--;
    q->completed++;
    q->truncated += truncated != 0;
    return queue_add(q, (uint32_t)head, len);
}

static int queue_complete(PyObject *queue, ChainObject *c, uint32_t len, int truncated)
{
    c->done = 1;
    return queue_complete_head((SplitQueueObject *)queue, c->head, len, truncated);
}

static PyObject *ring_owner_tuple(MemoryMapObject *mm, uint64_t a, uint64_t b, uint64_t c, uint64_t d,
                                  uint64_t e)
{
    uint64_t g[5] = {a, b, c, d, e};
    PyObject *t = PyTuple_New(5);
    if (!t)
        return NULL;
    for (int i = 0; i < 5; i++) {
        uint64_t off;
        int r = rc_mem_find(&mm->m, g[i], 1, &off);
        PyObject *o = r >= 0 ? mm->owners[r] : Py_None;
        PyTuple_SET_ITEM(t, i, Py_NewRef(o));
    }
    return t;
}

static int SplitQueue_init(SplitQueueObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"mem", "num", "desc", "avail", "used", NULL};
    PyObject *mem;
    unsigned int num;
    unsigned long long desc, avail, used;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!IKKK", kwlist, &MemoryMapType, &mem, &num, &desc, &avail, &used))
        return -1;
    MemoryMapObject *mm = (MemoryMapObject *)mem;
    int err = rc_queue_init(&self->q, &mm->m, num, desc, avail, used);
    if (err) {
        ring_error(err, -1, NULL);
        return -1;
    }
    Py_XSETREF(self->mem, (MemoryMapObject *)Py_NewRef(mem));
    Py_XSETREF(self->ring_owners, ring_owner_tuple(mm, desc, avail, used, desc, desc));
    if (!self->ring_owners)
        return -1;
    rc_chain_free(&self->chain);
    PyMem_Free(self->batch);
    self->batch = PyMem_Malloc(num * sizeof(struct rc_vring_used_elem));
    if (!self->batch) {
        PyErr_NoMemory();
        return -1;
    }
    self->nbatch = 0;
    self->batch_open = 0;
    self->call_fd = -1;
    self->detached = 0;
    return 0;
}

static void SplitQueue_dealloc(SplitQueueObject *self)
{
    Py_XDECREF(self->next);
    PyMem_Free(self->batch);
    Py_XDECREF(self->mem);
    Py_XDECREF(self->ring_owners);
    rc_chain_free(&self->chain);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_queue(SplitQueueObject *self)
{
    if (!self->mem) {
        PyErr_SetString(PyExc_RuntimeError, "SplitQueue not initialised");
        return -1;
    }
    return 0;
}

static PyObject *pop_into(SplitQueueObject *self, PyObject *out, int n);

static PyObject *SplitQueue_pop_chains(SplitQueueObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"max", NULL};
    Py_ssize_t max = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|n", kwlist, &max))
        return NULL;
    if (check_queue(self) < 0)
        return NULL;
    self->pending = 0; /* a serve_fast() group is over: what it had not popped is still available */
    rc_queue_want_kick(&self->q); /* EVENT_IDX: before the avail load, so no kick is lost in between */
    int n = rc_queue_avail(&self->q);
    if (n < 0)
        return ring_error(n, -1, NULL);
    if (max > 0 && n > max)
        n = (int)max;
    PyObject *out = PyList_New(n);
    if (!out)
        return NULL;
    /* A full ring makes thousands of container objects (views, lists) that cannot form cycles; with
     * the collector on, gen-0 passes over the growing batch every 700 allocations cost ~15% (perf). */
    int gc_was_enabled = PyGC_Disable();
    PyObject *r = pop_into(self, out, n);
    if (gc_was_enabled)
        PyGC_Enable();
    return r;
}

static PyObject *pop_into(SplitQueueObject *self, PyObject *out, int n)
{
    for (int i = 0; i < n; i++) {
        int err = rc_queue_pop(&self->q, &self->chain);
        if (err) {
            PyObject *good = PyList_GetSlice(out, 0, i);
            Py_DECREF(out);
            if (!good)
                return NULL;
            ring_error(err, self->chain.head, good);
            Py_DECREF(good);
            return NULL;
        }
        PyObject *c = chain_to_python(self->mem, &self->chain, (PyObject *)self);
        if (!c) {
            /* keep the list consistent: fill the rest so the decref is safe */
            for (int j = i; j < n; j++)
                PyList_SET_ITEM(out, j, Py_NewRef(Py_None));
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, c);
        self->inflight++;
        self->popped++;
    }
    return out;
}

static PyObject *SplitQueue_push_used(SplitQueueObject *self, PyObject *arg)
{
    if (check_queue(self) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(arg, "push_used() takes a sequence of (head, len)");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    struct rc_vring_used_elem stackbuf[256];
    struct rc_vring_used_elem *e = n <= 256 ? stackbuf : PyMem_Malloc((size_t)n * sizeof(*e));
    if (!e) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    int err = 0;
    for (Py_ssize_t i = 0; i < n && !err; i++) {
        PyObject *it = items[i];
        PyObject *h, *l;
        if (PyTuple_Check(it) && PyTuple_GET_SIZE(it) == 2) {
            h = PyTuple_GET_ITEM(it, 0);
            l = PyTuple_GET_ITEM(it, 1);
        } else {
            PyErr_SetString(PyExc_TypeError, "push_used() items must be (head, len) tuples");
            err = 1;
            break;
        }
        unsigned long hv = PyLong_AsUnsignedLong(h);
        unsigned long lv = PyLong_AsUnsignedLong(l);
        if (PyErr_Occurred()) {
            err = 1;
            break;
        }
        if (lv > 0xffffffffUL) {
            PyErr_SetString(PyExc_OverflowError, "used len does not fit in 32 bits");
            err = 1;
            break;
        }
        e[i].id = hv > 0xffffffffUL ? 0xffffffffu : (uint32_t)hv;
        e[i].len = (uint32_t)lv;
    }
    if (!err) {
        int r = rc_queue_push_used(&self->q, e, (uint32_t)n);
        if (r) {
            err = 1;
            ring_error(r, -1, NULL);
        }
    }
    if (e != stackbuf)
        PyMem_Free(e);
    Py_DECREF(seq);
    if (err)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *SplitQueue_avail_pending(SplitQueueObject *self, PyObject *unused)
{
    (void)unused;
    if (check_queue(self) < 0)
        return NULL;
    int n = rc_queue_avail(&self->q);
    if (n < 0)
        return ring_error(n, -1, NULL);
    return PyLong_FromLong(n);
}

static PyObject *SplitQueue_get_idx(SplitQueueObject *self, void *which)
{
    return PyLong_FromLong(which ? self->q.used_idx : self->q.last_avail_idx);
}

static int SplitQueue_set_idx(SplitQueueObject *self, PyObject *v, void *which)
{
    if (!v) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete");
        return -1;
    }
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (x < 0 || x > 0xffff) {
        PyErr_SetString(PyExc_ValueError, "ring index is 16 bits");
        return -1;
    }
    if (which)
        self->q.used_idx = (uint16_t)x;
    else
        self->q.last_avail_idx = (uint16_t)x;
    return 0;
}

static PyObject *SplitQueue_num(SplitQueueObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromLong(self->q.num);
}

/* ---- completions: Chain.reply()/complete() land here */

static int queue_begin_batch(SplitQueueObject *q)
{
    if (q->batch_open && queue_flush(q) < 0)
        return -1;
    q->batch_open = 1;
    q->batch_owner = PyThread_get_thread_ident();
    q->pending = 0;
    return 0;
}

static PyObject *SplitQueue_begin_batch(SplitQueueObject *self, PyObject *unused)
{
    (void)unused;
    if (check_queue(self) < 0)
        return NULL;
    if (queue_begin_batch(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int queue_end_batch(SplitQueueObject *q)
{
    q->batch_open = 0;
    q->pending = 0;
    return queue_flush(q);
}

/* end_batch()'s answer: the replies truncated to their chain's writable bytes since last asked */
static PyObject *truncated_since(SplitQueueObject *q)
{
    unsigned long long t = q->truncated - q->truncated_seen;
    q->truncated_seen = q->truncated;
    return PyLong_FromUnsignedLongLong(t);
}


static PyObject *SplitQueue_end_batch(SplitQueueObject *self, PyObject *unused)
{
    (void)unused;
    if (check_queue(self) < 0 || queue_end_batch(self) < 0)
        return NULL;
    return truncated_since(self);
}

static PyObject *SplitQueue_complete(SplitQueueObject *self, PyObject *args)
{
    unsigned int head, len = 0;
    if (!PyArg_ParseTuple(args, "I|I", &head, &len))
        return NULL;
    if (check_queue(self) < 0)
        return NULL;
    if (head >= self->q.num)
        return ring_error(RC_E_HEAD_RANGE, (int)(head & 0x7fffffff), NULL);
    if (queue_add(self, head, len) < 0)
        return NULL;
    Py_RETURN_NONE;
}


/* ---- serve_fast(): the queue thread's loop for what a native answerer serves (ring_answer.h) */

#define SERVE_STACK 4096 /* requests up to this size are gathered on the stack (a LOOKUP, a CREATE) */
#define SERVE_IOV 64     /* writable segments in the iovec on the stack; more take a heap array */

static PyObject *S_answerer, *S_fast;

static const struct rc_answerer *answerer_of(PyObject *fast)
{
    PyObject *cap = PyObject_GetAttr(fast, S_answerer);
    if (!cap) { /* a plain callable: served through a Chain (NULL without an error) */
        if (PyErr_ExceptionMatches(PyExc_AttributeError))
            PyErr_Clear();
        return NULL;
    }
    const struct rc_answerer *a = PyCapsule_GetPointer(cap, RC_ANSWERER_CAPSULE);
    Py_DECREF(cap); /* the capsule's struct is static in the answerer's module, which `fast` keeps loaded */
    if (a && (a->version != RC_ANSWERER_VERSION || a->size < sizeof *a || !a->answer)) {
        PyErr_SetString(PyExc_TypeError, "serve_fast(): the answerer was built for another interface version");
        return NULL;
    }
    return a;
}

/* fn(arg) inside an `except` of the exception now raised, as Python's `except Exception: fn(arg)` (a
 * handler that logs it sees it in sys.exc_info()); arg NULL: the exception itself.  Anything that is not an
 * Exception stays raised (NULL), as it would pass such an `except`. */
static PyObject *call_in_except(PyObject *fn, PyObject *arg)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (!v || !PyErr_GivenExceptionMatches(t, PyExc_Exception)) {
        PyErr_Restore(t, v, tb);
        return NULL;
    }
    if (tb)
        PyException_SetTraceback(v, tb);
    PyObject *a = arg ? arg : v;
    Py_INCREF(a);
    PyObject *ot, *ov, *otb;
    PyErr_GetExcInfo(&ot, &ov, &otb);
    PyErr_SetExcInfo(t, v, tb); /* steals */
    PyObject *r = PyObject_CallOneArg(fn, a);
    PyErr_SetExcInfo(ot, ov, otb);
    Py_DECREF(a);
    return r;
}

/* Copy len bytes into the iovec from entry *si, offset *so on (src NULL: only skip bytes already in place);
 * returns how many fitted.  scatter_at() for a chain that has no Chain object. */
static size_t scatter_iov(const struct iovec *iov, int n, int *si, size_t *so, const char *src, size_t len)
{
    size_t done = 0;
    while (*si < n && done < len) {
        size_t room = iov[*si].iov_len - *so, k = room < len - done ? room : len - done;
        if (src && k > 0)
            memcpy((char *)iov[*si].iov_base + *so, src + done, k);
        done += k;
        *so += k;
        if (*so >= iov[*si].iov_len) {
            (*si)++;
            *so = 0;
        }
    }
    return done;
}

/* Chain.reply(r) for an answer: r's buffers in order (r a buffer, or a tuple of parts as reply() takes,
 * a non-buffer part being that many bytes in place), then `in_place` bytes already written; 0 or -1.
 * *done: the completion was made (as Chain.done, set even when publishing it failed). */
static int reply_iov(SplitQueueObject *self, int head, const struct iovec *iov, int n, PyObject *r, size_t in_place,
                     int *done)
{
    int si = 0, truncated = 0;
    size_t so = 0, written = 0;
    PyObject *one[1] = {r};
    PyObject **items = one;
    Py_ssize_t nparts = 1;
    if (PyTuple_Check(r)) {
        items = &PyTuple_GET_ITEM(r, 0);
        nparts = PyTuple_GET_SIZE(r);
    }
    for (Py_ssize_t i = 0; i < nparts; i++) {
        size_t want, got;
        if (PyBytes_CheckExact(items[i])) {
            want = (size_t)PyBytes_GET_SIZE(items[i]);
            got = scatter_iov(iov, n, &si, &so, PyBytes_AS_STRING(items[i]), want);
        } else if (PyObject_CheckBuffer(items[i])) {
            Py_buffer b;
            if (PyObject_GetBuffer(items[i], &b, PyBUF_SIMPLE) < 0)
                return -1;
            want = (size_t)b.len;
            got = scatter_iov(iov, n, &si, &so, b.buf, want);
            PyBuffer_Release(&b);
        } else {
            Py_ssize_t w = PyObject_Length(items[i]);
            if (w < 0)
                return -1;
            want = (size_t)w;
            got = scatter_iov(iov, n, &si, &so, NULL, want);
        }
        written += got;
        truncated |= got < want;
    }
    if (in_place) {
        size_t got = scatter_iov(iov, n, &si, &so, NULL, in_place);
        written += got;
        truncated |= got < in_place;
    }
    if (written > 0xffffffffULL) {
        PyErr_SetString(PyExc_OverflowError, "reply longer than a used length");
        return -1;
    }
    *done = 1;
    return queue_complete_head(self, head, (uint32_t)written, truncated);
}

/* A chain an error escaped from completes with used.len 0 (the guest never waits on it); the error is kept. */
static void complete_keeping_error(SplitQueueObject *self, int head)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    if (queue_complete_head(self, head, 0, 0) < 0)
        PyErr_Clear();
    PyErr_Restore(t, v, tb);
}

/* Serve the chain just popped into self->chain: Py_None when the answerer served it (completed), a new
 * Chain when it declined (in flight: the caller serves it), NULL on an error that escaped (a chain not
 * completed yet is completed with used.len 0 first, so the guest never waits on it).  Only the thread that
 * pops may call it (self->chain is the queue's). */
static PyObject *serve_one(SplitQueueObject *self, const struct rc_answerer *ans, PyObject *fast, PyObject *failed,
                           PyObject *reply_failed)
{
    const struct rc_chain *c = &self->chain;
    int head = c->head;
    char stack[SERVE_STACK];
    PyObject *raw = NULL, *r = NULL, *pins[RC_MAX_REGIONS];
    uint64_t pinned = 0;
    int npins = 0, nw = 0, nr = 0, done = 0;
    struct iovec iov_stack[SERVE_IOV], *iov = iov_stack, rd_stack[SERVE_IOV], *rd = rd_stack;
    const char *req = stack;
    size_t len = (size_t)c->readable_len, in_place = 0;
    /* A request longer than the stack: its head gathered there, the rest left in guest memory (answer_iov),
     * or all of it gathered into a bytes object for an answerer without that entry. */
    int split = len > SERVE_STACK && RC_ANSWERER_HAS_IOV(ans);

    self->inflight++;
    self->popped++;
    if (len > SERVE_STACK && !split) {
        if (!(raw = readable_bytes(c)))
            goto escaped;
        req = PyBytes_AS_STRING(raw);
    } else {
        rc_chain_gather(c, (uint8_t *)stack, split ? SERVE_STACK : len);
    }
    for (uint32_t i = 0; i < c->nseg; i++) {
        nw += c->seg[i].write;
        nr += !c->seg[i].write;
    }
    if (nw > SERVE_IOV && !(iov = PyMem_Malloc((size_t)nw * sizeof *iov))) {
        iov = iov_stack;
        PyErr_NoMemory();
        goto escaped;
    }
    if (split && nr > SERVE_IOV && !(rd = PyMem_Malloc((size_t)nr * sizeof *rd))) {
        rd = rd_stack;
        PyErr_NoMemory();
        goto escaped;
    }
    nw = nr = 0;
    size_t skip = SERVE_STACK; /* split: the head's bytes, gathered */
    for (uint32_t i = 0; i < c->nseg; i++) {
        if (!c->seg[i].write) {
            if (!split)
                continue;
            if (skip >= c->seg[i].len) {
                skip -= c->seg[i].len;
                continue;
            }
            rd[nr].iov_base = c->seg[i].host + skip;
            rd[nr++].iov_len = c->seg[i].len - skip;
            skip = 0;
        } else {
            iov[nw].iov_base = c->seg[i].host;
            iov[nw++].iov_len = c->seg[i].len;
        }
        /* the answerer may release the GIL while it writes to the writable buffers or from the readable ones:
         * keep their regions mapped meanwhile (a region removed by then is only unmapped once its last holder
         * lets go, as with a Chain's views) */
        unsigned reg = c->seg[i].region;
        if (reg < 64 && !(pinned & (1ull << reg))) {
            pinned |= 1ull << reg;
            pins[npins++] = Py_NewRef(self->mem->owners[reg]);
        }
    }
    if (split) {
        r = ans->answer_iov(fast, stack, SERVE_STACK, rd, nr, len, iov, nw, &in_place);
        if (!r && !PyErr_Occurred()) { /* "gather it" */
            if (!(raw = readable_bytes(c)))
                goto escaped;
            req = PyBytes_AS_STRING(raw);
            in_place = 0;
            r = ans->answer(fast, req, len, iov, nw, &in_place);
        }
    } else {
        r = ans->answer(fast, req, len, iov, nw, &in_place);
    }
    if (!r) { /* Python's `except Exception: r = failed(raw)` */
        if (!raw && !(raw = split ? readable_bytes(c) : PyBytes_FromStringAndSize(stack, (Py_ssize_t)len)))
            goto escaped;
        in_place = 0;
        if (!(r = call_in_except(failed, raw)))
            goto escaped;
    }
    if (r == Py_None) { /* declined: the chain goes to Python as it would have come from pop_chains() */
        Py_CLEAR(r);
        if (!raw && !(raw = split ? readable_bytes(c) : PyBytes_FromStringAndSize(stack, (Py_ssize_t)len)))
            goto escaped;
        r = chain_with(self->mem, c, (PyObject *)self, raw);
        raw = NULL;
        if (!r)
            goto escaped;
        goto out;
    }
    int full = PyObject_IsTrue(r);
    if (full < 0)
        goto escaped;
    if (!full) { /* served, no reply (FORGET) */
        done = 1;
        if (queue_complete_head(self, head, 0, 0) < 0)
            goto escaped;
    } else if (reply_iov(self, head, iov, nw, r, in_place, &done) < 0) {
        /* Python: chain.reply() raised: reply_failed(e) */
        PyObject *x = call_in_except(reply_failed, NULL);
        if (!x)
            goto escaped;
        Py_DECREF(x);
    }
    Py_SETREF(r, Py_NewRef(Py_None));
    goto out;
escaped:
    Py_CLEAR(r);
    if (!done)
        complete_keeping_error(self, head);
out:
    for (int i = 0; i < npins; i++)
        Py_DECREF(pins[i]);
    if (iov != iov_stack)
        PyMem_Free(iov);
    if (rd != rd_stack)
        PyMem_Free(rd);
    release_bytes(raw);
    return r;
}

/* serve_one() for an answerer without a C entry (a Python callable): what the daemon's queue thread did in
 * Python, through a Chain object (the twin's serve_fast, step for step). */
static PyObject *serve_one_py(SplitQueueObject *self, PyObject *fast, PyObject *failed, PyObject *reply_failed)
{
    self->inflight++;
    self->popped++;
    PyObject *raw = readable_bytes(&self->chain), *r = NULL, *x;
    if (!raw) {
        complete_keeping_error(self, self->chain.head);
        return NULL;
    }
    ChainObject *c = (ChainObject *)chain_with(self->mem, &self->chain, (PyObject *)self, Py_NewRef(raw));
    if (!c) {
        Py_DECREF(raw);
        complete_keeping_error(self, self->chain.head);
        return NULL;
    }
    r = PyObject_CallFunctionObjArgs(fast, raw, (PyObject *)c, NULL);
    if (!r && !(r = call_in_except(failed, raw)))
        goto escaped;
    if (r == Py_None) {
        Py_DECREF(r);
        Py_DECREF(raw);
        return (PyObject *)c;
    }
    int full = PyObject_IsTrue(r);
    if (full < 0)
        goto escaped;
    if (full) {
        PyObject *parts = PyTuple_Check(r) ? Py_NewRef(r) : PyTuple_Pack(1, r);
        x = parts ? Chain_reply(c, parts) : NULL;
        Py_XDECREF(parts);
        if (!x && !(x = call_in_except(reply_failed, NULL)))
            goto escaped;
    } else {
        PyObject *none = PyTuple_New(0);
        x = none ? Chain_complete(c, none) : NULL;
        Py_XDECREF(none);
        if (!x)
            goto escaped;
    }
    Py_DECREF(x);
    Py_DECREF(r);
    Py_DECREF(raw);
    Py_DECREF(c);
    Py_RETURN_NONE;
escaped:
    Py_XDECREF(r);
    Py_DECREF(raw);
    if (!c->done && c->queue) { /* completed with nothing written, the error kept */
        PyObject *t, *v, *tb;
        PyErr_Fetch(&t, &v, &tb);
        if (queue_complete(c->queue, c, 0, 0) < 0)
            PyErr_Clear();
        PyErr_Restore(t, v, tb);
    }
    Py_DECREF(c);
    return NULL;
}

/* What pop_chains() would pop now (EVENT_IDX: the kick asked for first): n > 0, or 0 and *out the answer for
 * the caller, the replies truncated since last asked when the ring is empty (NULL on an error). */
static int next_group(SplitQueueObject *self, PyObject **out)
{
    rc_queue_want_kick(&self->q);
    int n = rc_queue_avail(&self->q);
    if (n > 0)
        return n;
    *out = n < 0 ? ring_error(n, -1, NULL) : truncated_since(self);
    return 0;
}

static PyObject *serve_fast(SplitQueueObject *self, PyObject *src, PyObject *failed, PyObject *reply_failed)
{
    if (self->pending == 0 || !self->batch_open) { /* a new group: what pop_chains() would pop now */
        if (self->batch_open && queue_end_batch(self) < 0) /* the last group ended with a declined chain */
            return NULL;
        PyObject *out;
        int n = next_group(self, &out);
        if (n == 0)
            return out;
        if (queue_begin_batch(self) < 0)
            return NULL;
        self->pending = (uint32_t)n;
    }
    while (self->pending > 0) {
        PyObject *fast = PyObject_GetAttr(src, S_fast); /* read per chain, as the daemon's loop did */
        if (!fast)
            return NULL;
        const struct rc_answerer *ans = fast != Py_None ? answerer_of(fast) : NULL;
        if (!ans && PyErr_Occurred()) {
            Py_DECREF(fast);
            return NULL;
        }
        self->pending--;
        int err = rc_queue_pop(&self->q, &self->chain);
        if (err) { /* consumed; the batch stays open: the caller completes the head and calls again */
            Py_DECREF(fast);
            return ring_error(err, self->chain.head, NULL);
        }
        PyObject *r;
        if (fast == Py_None) { /* no answerer now: the chain goes to the caller as a declined one */
            if ((r = chain_to_python(self->mem, &self->chain, (PyObject *)self))) {
                self->inflight++;
                self->popped++;
            }
        } else {
            r = ans ? serve_one(self, ans, fast, failed, reply_failed) : serve_one_py(self, fast, failed, reply_failed);
        }
        Py_DECREF(fast);
        if (r != Py_None)
            return r; /* a Chain the answerer declined (the batch stays open), or NULL */
        Py_DECREF(r);
    }
    if (queue_end_batch(self) < 0)
        return NULL;
    PyObject *out;
    if (next_group(self, &out) == 0)
        return out;
    Py_RETURN_NONE;
}

static PyObject *SplitQueue_serve_fast(SplitQueueObject *self, PyObject *args)
{
    PyObject *src, *failed, *reply_failed;
    if (!PyArg_ParseTuple(args, "OOO:serve_fast", &src, &failed, &reply_failed))
        return NULL;
    if (check_queue(self) < 0)
        return NULL;
    return serve_fast(self, src, failed, reply_failed);
}

/* serve_fast(), and while the ring is empty the wait for the next kick, in one C loop: the queue thread of
 * a daemon leaves it only for a chain the answerer declines (returned as serve_fast() returns it) or when
 * `wake_fd` fired in the epoll set `ep` (returns the replies truncated meanwhile).  The wait releases the
 * GIL; the set is edge-triggered and its eventfds are never read (the daemon's _queue_loop). */
static PyObject *SplitQueue_serve_wait(SplitQueueObject *self, PyObject *args)
{
    PyObject *ep, *src, *failed, *reply_failed;
    int wake;
    if (!PyArg_ParseTuple(args, "OiOOO:serve_wait", &ep, &wake, &src, &failed, &reply_failed))
        return NULL;
    if (check_queue(self) < 0)
        return NULL;
    int epfd = PyObject_AsFileDescriptor(ep);
    if (epfd < 0)
        return NULL;
    unsigned long long truncated = 0;
    for (;;) {
        PyObject *r = serve_fast(self, src, failed, reply_failed);
        if (!r)
            return NULL;
        int timeout = 0; /* None: a group was published and more are available: only look whether woken */
        if (PyLong_CheckExact(r)) { /* the ring is empty: wait */
            truncated += PyLong_AsUnsignedLongLong(r);
            timeout = -1;
        } else if (r != Py_None) {
            return r; /* a declined chain */
        }
        Py_DECREF(r);
        struct epoll_event ev[4];
        int n, err = 0;
        Py_BEGIN_ALLOW_THREADS
        do
            n = epoll_wait(epfd, ev, 4, timeout);
        while (n < 0 && errno == EINTR);
        if (n < 0)
            err = errno;
        Py_END_ALLOW_THREADS
        if (n < 0) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        for (int i = 0; i < n; i++)
            if (ev[i].data.fd == wake)
                return PyLong_FromUnsignedLongLong(truncated);
    }
}

static PyObject *SplitQueue_detach(SplitQueueObject *self, PyObject *unused)
{
    (void)unused;
    if (check_queue(self) < 0)
        return NULL;
    if (queue_end_batch(self) < 0)
        return NULL;
    self->detached = 1;
    self->call_fd = -1;
    Py_RETURN_NONE;
}

static PyObject *SplitQueue_handover(SplitQueueObject *self, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, Py_TYPE(self)) || arg == (PyObject *)self) {
        PyErr_SetString(PyExc_TypeError, "handover() takes another SplitQueue");
        return NULL;
    }
    SplitQueueObject *to = (SplitQueueObject *)arg;
    if (check_queue(self) < 0 || check_queue(to) < 0)
        return NULL;
    for (SplitQueueObject *q = to; q; q = (SplitQueueObject *)q->next)
        if (q == self) {
            PyErr_SetString(PyExc_ValueError, "handover() would make a loop");
            return NULL;
        }
    if (self->next) {
        PyErr_SetString(PyExc_ValueError, "this queue was already handed over");
        return NULL;
    }
    if (queue_end_batch(self) < 0)
        return NULL;
    to->inflight += self->inflight;
    self->inflight = 0;
    self->call_fd = -1;
    self->next = Py_NewRef(arg);
    Py_RETURN_NONE;
}

static PyObject *SplitQueue_get_call_fd(SplitQueueObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromLong(self->call_fd);
}

static int SplitQueue_set_call_fd(SplitQueueObject *self, PyObject *v, void *closure)
{
    (void)closure;
    long fd = v ? PyLong_AsLong(v) : -1;
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < -1 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "call_fd is an fd or -1");
        return -1;
    }
    self->call_fd = self->detached ? -1 : (int)fd;
    return 0;
}

static PyObject *SplitQueue_get_event_idx(SplitQueueObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->q.event_idx);
}

static int SplitQueue_set_event_idx(SplitQueueObject *self, PyObject *v, void *closure)
{
    (void)closure;
    int on = v ? PyObject_IsTrue(v) : 0;
    if (on < 0)
        return -1;
    self->q.event_idx = on;
    self->q.signalled_valid = 0;
    return 0;
}

static PyObject *SplitQueue_get_inflight(SplitQueueObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->inflight);
}

static PyObject *SplitQueue_counters(SplitQueueObject *self, void *closure)
{
    (void)closure;
    return Py_BuildValue("{sKsKsKsKsKsnsK}", "calls", self->calls, "calls_suppressed", self->suppressed,
                         "completed", self->completed, "late", self->late, "truncated", self->truncated,
                         "inflight", self->inflight, "popped", self->popped);
}

static PyMethodDef SplitQueue_methods[] = {
    {"pop_chains", (PyCFunction)(void (*)(void))SplitQueue_pop_chains, METH_VARARGS | METH_KEYWORDS,
     "pop_chains(max=0) -> [Chain]: every available chain (max > 0 limits the batch)"},
    {"push_used", (PyCFunction)SplitQueue_push_used, METH_O,
     "push_used([(head, len), ...]): write the elements, then publish used->idx once"},
    {"avail_pending", (PyCFunction)SplitQueue_avail_pending, METH_NOARGS, "entries available, not popped"},
    {"begin_batch", (PyCFunction)SplitQueue_begin_batch, METH_NOARGS,
     "completions from this thread wait for end_batch()"},
    {"end_batch", (PyCFunction)SplitQueue_end_batch, METH_NOARGS,
     "end_batch() -> truncated: publish the batch (one used->idx store, at most one call)"},
    {"complete", (PyCFunction)SplitQueue_complete, METH_VARARGS,
     "complete(head, len=0): a used entry for a head with no Chain (a malformed one)"},
    {"serve_fast", (PyCFunction)SplitQueue_serve_fast, METH_VARARGS,
     "serve_fast(src, failed, reply_failed) -> Chain | None | truncated: pop and answer through src.fast (read "
     "per chain; a native answerer through dissectors/ring/ring_answer.h) until it declines a chain (returned, "
     "batch open), a group is "
     "published with more available (None) or the ring is empty (the replies truncated since last asked)"},
    {"serve_wait", (PyCFunction)SplitQueue_serve_wait, METH_VARARGS,
     "serve_wait(ep, wake_fd, src, failed, reply_failed) -> Chain | truncated: serve_fast(), waiting in `ep` "
     "(GIL released) whenever the ring is empty, until a chain is declined or `wake_fd` fires"},
    {"detach", (PyCFunction)SplitQueue_detach, METH_NOARGS, "drop every later completion (the ring is gone)"},
    {"handover", (PyCFunction)SplitQueue_handover, METH_O,
     "handover(new): chains popped here complete on `new` from now on (the ring was re-made)"},
    {NULL},
};
static PyGetSetDef SplitQueue_getset[] = {
    {"last_avail_idx", (getter)SplitQueue_get_idx, (setter)SplitQueue_set_idx, "next avail entry to pop", NULL},
    {"used_idx", (getter)SplitQueue_get_idx, (setter)SplitQueue_set_idx, "next used index to publish", (void *)1},
    {"num", (getter)SplitQueue_num, NULL, "queue size", NULL},
    {"call_fd", (getter)SplitQueue_get_call_fd, (setter)SplitQueue_set_call_fd, "eventfd written per call, -1: none", NULL},
    {"event_idx", (getter)SplitQueue_get_event_idx, (setter)SplitQueue_set_event_idx, "VIRTIO_RING_F_EVENT_IDX", NULL},
    {"inflight", (getter)SplitQueue_get_inflight, NULL, "popped chains not completed yet", NULL},
    {"counters", (getter)SplitQueue_counters, NULL, "calls, calls_suppressed, completed, late, truncated, inflight", NULL},
    {NULL},
};

static PyTypeObject SplitQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dissectors.ring._ring.SplitQueue",
    .tp_basicsize = sizeof(SplitQueueObject),
    .tp_dealloc = (destructor)SplitQueue_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SplitQueue(mem, num, desc, avail, used): a split virtqueue seen by the device (GPAs).",
    .tp_methods = SplitQueue_methods,
    .tp_getset = SplitQueue_getset,
    .tp_init = (initproc)SplitQueue_init,
    .tp_new = PyType_GenericNew,
};

/* ================================================================== CaptureBuffer */

typedef struct {
    PyObject_HEAD
    struct rc_capture c;
    int ok;
} CaptureBufferObject;

static int CaptureBuffer_init(CaptureBufferObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"capacity", "policy", NULL};
    unsigned long long capacity = 16ull << 20;
    const char *policy = "drop";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|Ks", kwlist, &capacity, &policy))
        return -1;
    int pol;
    if (!strcmp(policy, "drop"))
        pol = RC_POLICY_DROP;
    else if (!strcmp(policy, "lossless"))
        pol = RC_POLICY_LOSSLESS;
    else {
        PyErr_Format(PyExc_ValueError, "policy must be 'drop' or 'lossless', not %R", PyTuple_GET_ITEM(args, 1));
        return -1;
    }
    if (self->ok) {
        PyErr_SetString(PyExc_RuntimeError, "CaptureBuffer already initialised");
        return -1;
    }
    if (rc_capture_init(&self->c, capacity, pol)) {
        PyErr_NoMemory();
        return -1;
    }
    self->ok = 1;
    return 0;
}

static void CaptureBuffer_dealloc(CaptureBufferObject *self)
{
    if (self->ok)
        rc_capture_destroy(&self->c);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *capture_to_python(const struct rc_cap_hdr *h)
{
    const struct rc_layout *l = (const struct rc_layout *)(h + 1);
    PyObject *layout = PyTuple_New(h->nlayout);
    if (!layout)
        return NULL;
    for (uint32_t i = 0; i < h->nlayout; i++) {
        PyObject *e = Py_BuildValue("KIH", (unsigned long long)l[i].addr, l[i].len, l[i].flags);
        if (!e) {
            Py_DECREF(layout);
            return NULL;
        }
        PyTuple_SET_ITEM(layout, i, e);
    }
    const char *data = (const char *)(l + h->nlayout);
    PyObject *kind = KindNames[h->kind < 4 ? h->kind : 0];
    PyObject *reason = h->kind == RC_CAP_ERROR ? PyUnicode_FromString(rc_err_name(h->reason)) : Py_NewRef(Py_None);
    if (!reason) {
        Py_DECREF(layout);
        return NULL;
    }
    PyObject *r = PyObject_CallFunction(CaptureType, "OHHKNIy#ONI", kind, h->queue, h->head,
                                        (unsigned long long)h->ts_ns, layout, h->orig_len, data,
                                        (Py_ssize_t)h->data_len,
                                        (h->flags & RC_CAP_F_TRUNCATED) ? Py_True : Py_False, reason,
                                        (unsigned int)h->flags);
    return r;
}

static PyObject *CaptureBuffer_read_captures(CaptureBufferObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"max", "timeout", NULL};
    Py_ssize_t max = 1024;
    double timeout = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|nd", kwlist, &max, &timeout))
        return NULL;
    struct rc_capture *c = &self->c;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (int attempt = 0; attempt < 2; attempt++) {
        uint64_t v;
        int nfd = __atomic_load_n(&c->notify_fd, __ATOMIC_ACQUIRE); /* -1 once closed */
        if (nfd >= 0) {
            ssize_t rr = read(nfd, &v, sizeof(v)); /* clear first, then drain: no lost wake-up */
            (void)rr;
        }
        uint64_t pos = __atomic_load_n(&c->tail, __ATOMIC_ACQUIRE);
        const struct rc_cap_hdr *h;
        while ((max <= 0 || PyList_GET_SIZE(out) < max) && (h = rc_capture_peek(c, &pos))) {
            PyObject *cap = capture_to_python(h);
            if (!cap || PyList_Append(out, cap) < 0) {
                Py_XDECREF(cap);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(cap);
            pos += h->rec_len;
        }
        if (pos != c->tail)
            rc_capture_release(c, pos);
        if (PyList_GET_SIZE(out) || timeout <= 0 || attempt || nfd < 0)
            break; /* closed: what was buffered is all there will be */
        struct pollfd pfd = {.fd = nfd, .events = POLLIN};
        int ms = timeout > 86400 ? 86400000 : (int)(timeout * 1000.0 + 0.999);
        int pr;
        Py_BEGIN_ALLOW_THREADS
        pr = poll(&pfd, 1, ms);
        Py_END_ALLOW_THREADS
        if (pr < 0 && PyErr_CheckSignals() < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

static PyObject *CaptureBuffer_close(CaptureBufferObject *self, PyObject *unused)
{
    (void)unused;
    rc_capture_close(&self->c);
    Py_RETURN_NONE;
}

static PyObject *CaptureBuffer_fileno(CaptureBufferObject *self, PyObject *unused)
{
    (void)unused;
    return PyLong_FromLong(self->c.notify_fd);
}

static PyObject *CaptureBuffer_stats(CaptureBufferObject *self, void *closure)
{
    (void)closure;
    struct rc_capture *c = &self->c;
    pthread_mutex_lock(&c->lock);
    PyObject *d = Py_BuildValue("{sKsKsKsKsKsK}", "captured", (unsigned long long)c->captured, "dropped",
                                (unsigned long long)c->dropped, "dropped_bytes", (unsigned long long)c->dropped_bytes,
                                "stalls", (unsigned long long)c->stalls, "used_bytes",
                                (unsigned long long)(c->head - c->tail), "capacity", (unsigned long long)c->cap);
    pthread_mutex_unlock(&c->lock);
    return d;
}

static PyMethodDef CaptureBuffer_methods[] = {
    {"read_captures", (PyCFunction)(void (*)(void))CaptureBuffer_read_captures, METH_VARARGS | METH_KEYWORDS,
     "read_captures(max=1024, timeout=0.0) -> [Capture]; waits up to timeout seconds if empty"},
    {"fileno", (PyCFunction)CaptureBuffer_fileno, METH_NOARGS, "eventfd readable when captures are pending (-1: closed)"},
    {"close", (PyCFunction)CaptureBuffer_close, METH_NOARGS,
     "close the eventfd (end of session, once its paths are closed and its consumer stopped; idempotent): "
     "buffered records stay readable, nothing waits"},
    {NULL},
};
static PyGetSetDef CaptureBuffer_getset[] = {
    {"stats", (getter)CaptureBuffer_stats, NULL, "captured, dropped, dropped_bytes, stalls, used_bytes, capacity", NULL},
    {NULL},
};

static PyTypeObject CaptureBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dissectors.ring._ring.CaptureBuffer",
    .tp_basicsize = sizeof(CaptureBufferObject),
    .tp_dealloc = (destructor)CaptureBuffer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "CaptureBuffer(capacity=16 MiB, policy='drop'|'lossless'): bounded capture records.",
    .tp_methods = CaptureBuffer_methods,
    .tp_getset = CaptureBuffer_getset,
    .tp_init = (initproc)CaptureBuffer_init,
    .tp_new = PyType_GenericNew,
};

/* ================================================================== ShadowPath */

typedef struct {
    PyObject_HEAD
    MemoryMapObject *mem;
    CaptureBufferObject *cap;
    PyObject *ring_owners;
    struct rc_path p;
    int ok;
    int closed; /* close() ran (set before the GIL is released: no call races it into a closed path) */
} ShadowPathObject;

static int ShadowPath_init(ShadowPathObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"mem", "queue", "num", "desc", "avail", "used", "shadow_avail", "shadow_used",
                             "capture", "kick_fd", "call_fd", "backend_kick_fd", "backend_call_fd",
                             "avail_base", "snaplen", "spin_us", "event_idx", NULL};
    PyObject *mem, *cap;
    unsigned int queue, num, avail_base = 0, snaplen = 0, spin_us = 0;
    int event_idx = 0;
    unsigned long long desc, avail, used, savail, sused;
    int kick_fd, call_fd, bkick_fd, bcall_fd;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!IIKKKKKO!iiii|IIIp", kwlist, &MemoryMapType, &mem, &queue,
                                     &num, &desc, &avail, &used, &savail, &sused, &CaptureBufferType, &cap,
                                     &kick_fd, &call_fd, &bkick_fd, &bcall_fd, &avail_base, &snaplen, &spin_us,
                                     &event_idx))
        return -1;
    if (self->ok) {
        PyErr_SetString(PyExc_RuntimeError, "ShadowPath already initialised");
        return -1;
    }
    if (queue > 0xffff || avail_base > 0xffff) {
        PyErr_SetString(PyExc_ValueError, "queue and avail_base are 16-bit");
        return -1;
    }
    if (bkick_fd < 0 || bcall_fd < 0) {
        PyErr_SetString(PyExc_ValueError, "the backend kick and call fds are required");
        return -1;
    }
    MemoryMapObject *mm = (MemoryMapObject *)mem;
    int err = rc_path_init(&self->p, &mm->m, (uint16_t)queue, num, desc, avail, used, savail, sused,
                           &((CaptureBufferObject *)cap)->c, kick_fd, call_fd, bkick_fd, bcall_fd,
                           (uint16_t)avail_base, snaplen, spin_us);
    if (err) {
        if (err == RC_E_NOMEM)
            PyErr_SetFromErrno(PyExc_OSError);
        else
            ring_error(err, -1, NULL);
        return -1;
    }
    rc_path_set_event_idx(&self->p, event_idx);
    self->ok = 1;
    self->mem = (MemoryMapObject *)Py_NewRef(mem);
    self->cap = (CaptureBufferObject *)Py_NewRef(cap);
    self->ring_owners = ring_owner_tuple(mm, desc, avail, used, savail, sused);
    return self->ring_owners ? 0 : -1;
}

/* Run a core call that stops the path (stop, close, destroy) without the GIL: it joins the thread, which
 * may be waiting for the capture consumer.  A path that ran no longer locks the memory map. */
static void path_ending(ShadowPathObject *self, void (*end)(struct rc_path *))
{
    int was_running = self->p.running;
    Py_BEGIN_ALLOW_THREADS
    end(&self->p);
    Py_END_ALLOW_THREADS
    if (was_running)
        self->mem->busy--;
}

static void ShadowPath_dealloc(ShadowPathObject *self)
{
    if (self->ok)
        path_ending(self, rc_path_destroy);
    Py_XDECREF(self->mem);
    Py_XDECREF(self->cap);
    Py_XDECREF(self->ring_owners);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_path(ShadowPathObject *self)
{
    if (!self->ok) {
        PyErr_SetString(PyExc_RuntimeError, "ShadowPath not initialised");
        return -1;
    }
    return 0;
}

/* start/step/drain and the fd setters need the fds and the rings, which close() gave back */
static int check_path_open(ShadowPathObject *self)
{
    if (check_path(self) < 0)
        return -1;
    if (self->closed) {
        PyErr_SetString(PyExc_RuntimeError, "ShadowPath closed");
        return -1;
    }
    return 0;
}

static PyObject *ShadowPath_start(ShadowPathObject *self, PyObject *unused)
{
    (void)unused;
    if (check_path_open(self) < 0)
        return NULL;
    if (self->p.running)
        Py_RETURN_NONE;
    if (rc_path_start(&self->p))
        return PyErr_SetFromErrno(PyExc_OSError);
    self->mem->busy++;
    Py_RETURN_NONE;
}

static PyObject *ShadowPath_stop(ShadowPathObject *self, PyObject *unused)
{
    (void)unused;
    if (check_path(self) < 0)
        return NULL;
    path_ending(self, rc_path_stop); /* stopped or not: the safety rule resolves whatever is held */
    Py_RETURN_NONE;
}

static PyObject *ShadowPath_close(ShadowPathObject *self, PyObject *unused)
{
    (void)unused;
    if (check_path(self) < 0)
        return NULL;
    if (self->closed)
        Py_RETURN_NONE;
    self->closed = 1;
    path_ending(self, rc_path_close);
    Py_CLEAR(self->ring_owners); /* the rings' mappings may go now: nothing reads them again */
    Py_RETURN_NONE;
}

static PyObject *ShadowPath_drain(ShadowPathObject *self, PyObject *unused)
{
    (void)unused;
    if (check_path_open(self) < 0)
        return NULL;
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = rc_path_drain(&self->p);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n < 0 ? 0 : n);
}

static PyObject *ShadowPath_step(ShadowPathObject *self, PyObject *unused)
{
    (void)unused;
    if (check_path_open(self) < 0)
        return NULL;
    if (self->p.running) {
        PyErr_SetString(PyExc_RuntimeError, "step() is for a stopped path; the thread is running");
        return NULL;
    }
    int a, u;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->p.proc_lock);
    a = rc_path_forward_avail(&self->p, 0);
    u = rc_path_forward_used(&self->p, 0);
    pthread_mutex_unlock(&self->p.proc_lock);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("ii", a < 0 ? 0 : a, u < 0 ? 0 : u);
}

static PyObject *ShadowPath_set_fd(ShadowPathObject *self, PyObject *arg, int which)
{
    if (check_path_open(self) < 0)
        return NULL;
    int fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = which ? rc_path_set_call_fd(&self->p, fd) : rc_path_set_kick_fd(&self->p, fd);
    Py_END_ALLOW_THREADS
    if (r)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *ShadowPath_set_kick_fd(ShadowPathObject *self, PyObject *arg) { return ShadowPath_set_fd(self, arg, 0); }
static PyObject *ShadowPath_set_call_fd(ShadowPathObject *self, PyObject *arg) { return ShadowPath_set_fd(self, arg, 1); }

static PyObject *ShadowPath_counters(ShadowPathObject *self, void *closure)
{
    (void)closure;
    if (check_path(self) < 0)
        return NULL;
    struct rc_path_counters k = self->p.ctr; /* a torn read of a counter is harmless here */
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsK}", "requests", k.requests, "replies",
                         k.replies, "errors", k.errors, "unpaired", k.unpaired, "kicks_in", k.kicks_in, "calls_in",
                         k.calls_in, "kicks_out", k.kicks_out, "calls_out", k.calls_out, "stalls", k.stalls, "dropped",
                         k.dropped, "wakeups", k.wakeups, "spin_hits", k.spin_hits, "busy_ns", k.busy_ns,
                         "busy_max_ns", k.busy_max_ns, "kicks_suppressed", k.kicks_suppressed,
                         "calls_suppressed", k.calls_suppressed, "holds", k.holds, "released", k.released,
                         "answered", k.answered, "rewritten", k.rewritten, "hold_drops", k.hold_drops,
                         "safety", k.safety);
}

/* set_hold_rules(rules): each rule has .direction (1 request, 2 reply, 3 both), .queues (u64 bitmask,
 * 0 = every queue) and .opcodes (ints, u32; empty = every opcode); HoldRule in _common.py. */
static int rule_fields(PyObject *rule, unsigned long *dir, unsigned long long *queues, PyObject **ops)
{
    PyObject *d = PyObject_GetAttrString(rule, "direction");
    PyObject *q = d ? PyObject_GetAttrString(rule, "queues") : NULL;
    PyObject *o = q ? PyObject_GetAttrString(rule, "opcodes") : NULL;
    int ok = -1;
    if (o) {
        *dir = PyLong_AsUnsignedLong(d);
        if (!PyErr_Occurred())
            *queues = PyLong_AsUnsignedLongLong(q);
        if (!PyErr_Occurred())
            *ops = PySequence_Fast(o, "HoldRule.opcodes must be a collection of ints");
        if (!PyErr_Occurred())
            ok = 0;
    }
    if (ok < 0 && (PyErr_ExceptionMatches(PyExc_OverflowError) || PyErr_ExceptionMatches(PyExc_TypeError))) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "bad hold rule %R: direction 1|2|3, queues a u64 bitmask, opcodes u32s",
                     rule);
    }
    Py_XDECREF(d);
    Py_XDECREF(q);
    Py_XDECREF(o);
    return ok;
}

static PyObject *ShadowPath_set_hold_rules(ShadowPathObject *self, PyObject *arg)
{
    if (check_path(self) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(arg, "set_hold_rules() takes a sequence of HoldRule");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **opsl = PyMem_Calloc(n ? (size_t)n : 1, sizeof(PyObject *));
    unsigned long *dirs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(unsigned long));
    unsigned long long *qs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(unsigned long long));
    struct rc_hold_table *t = NULL;
    Py_ssize_t total = 0, i;
    if (!opsl || !dirs || !qs) {
        PyErr_NoMemory();
        goto out;
    }
    for (i = 0; i < n; i++) {
        if (rule_fields(PySequence_Fast_GET_ITEM(seq, i), &dirs[i], &qs[i], &opsl[i]) < 0)
            goto out;
        if (dirs[i] < 1 || dirs[i] > 3) {
            PyErr_Format(PyExc_ValueError, "hold rule direction must be 1 (request), 2 (reply) or 3, not %lu",
                         dirs[i]);
            goto out;
        }
        total += PySequence_Fast_GET_SIZE(opsl[i]);
    }
    t = rc_hold_table_new((uint32_t)n, (uint32_t)total);
    if (!t) {
        PyErr_NoMemory();
        goto out;
    }
    uint32_t *cursor = t->n ? t->r[0].ops : NULL;
    for (i = 0; i < n; i++) {
        Py_ssize_t k = PySequence_Fast_GET_SIZE(opsl[i]);
        t->r[i].direction = (uint32_t)dirs[i];
        t->r[i].queues = qs[i];
        t->r[i].ops = cursor;
        t->r[i].nops = (uint32_t)k;
        for (Py_ssize_t j = 0; j < k; j++) {
            unsigned long op = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(opsl[i], j));
            if ((op == (unsigned long)-1 && PyErr_Occurred()) || op > 0xFFFFFFFEul) {
                PyErr_Clear();
                PyErr_Format(PyExc_ValueError, "hold rule opcode %R is not a u32 opcode",
                             PySequence_Fast_GET_ITEM(opsl[i], j));
                rc_hold_table_unref(t);
                t = NULL;
                goto out;
            }
            cursor[j] = (uint32_t)op;
        }
        cursor += k;
    }
    Py_BEGIN_ALLOW_THREADS
    rc_path_set_hold_rules(&self->p, t); /* takes the table */
    Py_END_ALLOW_THREADS
    t = NULL;
out:
    for (i = 0; opsl && i < n; i++)
        Py_XDECREF(opsl[i]);
    PyMem_Free(opsl);
    PyMem_Free(dirs);
    PyMem_Free(qs);
    Py_DECREF(seq);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *verdict(ShadowPathObject *self, PyObject *args, int kind, int with_data)
{
    if (check_path(self) < 0)
        return NULL;
    int head;
    Py_buffer data = {0};
    if (with_data ? !PyArg_ParseTuple(args, "iy*", &head, &data) : !PyArg_ParseTuple(args, "i", &head))
        return NULL;
    int err;
    if (head < 0 || head > 0xffff) {
        err = RC_E_NOT_HELD;
    } else if (with_data && (size_t)data.len > UINT32_MAX) {
        err = RC_E_NO_ROOM;
    } else {
        Py_BEGIN_ALLOW_THREADS
        err = rc_path_verdict(&self->p, (uint16_t)head, kind, data.buf, (uint32_t)data.len);
        Py_END_ALLOW_THREADS
    }
    if (with_data)
        PyBuffer_Release(&data);
    if (err == RC_E_NOMEM)
        return PyErr_NoMemory();
    if (err)
        return ring_error(err, head, NULL);
    Py_RETURN_NONE;
}

static PyObject *ShadowPath_release(ShadowPathObject *self, PyObject *args) { return verdict(self, args, RC_V_RELEASE, 0); }
static PyObject *ShadowPath_answer(ShadowPathObject *self, PyObject *args) { return verdict(self, args, RC_V_ANSWER, 1); }
static PyObject *ShadowPath_rewrite(ShadowPathObject *self, PyObject *args) { return verdict(self, args, RC_V_REWRITE, 1); }
static PyObject *ShadowPath_drop(ShadowPathObject *self, PyObject *args) { return verdict(self, args, RC_V_DROP, 0); }

static PyObject *ShadowPath_held(ShadowPathObject *self, PyObject *unused)
{
    (void)unused;
    if (check_path(self) < 0)
        return NULL;
    uint32_t *out = PyMem_Malloc(sizeof(uint32_t) * self->p.num);
    if (!out)
        return PyErr_NoMemory();
    uint32_t n;
    Py_BEGIN_ALLOW_THREADS
    n = rc_path_held(&self->p, out, self->p.num);
    Py_END_ALLOW_THREADS
    PyObject *l = PyList_New(n);
    for (uint32_t i = 0; l && i < n; i++) {
        PyObject *t = Py_BuildValue("II", out[i] & 0xffff, out[i] >> 16);
        if (!t) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, i, t);
    }
    PyMem_Free(out);
    return l;
}

static PyObject *ShadowPath_running(ShadowPathObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->ok && self->p.running);
}

static PyObject *ShadowPath_last_error(ShadowPathObject *self, void *closure)
{
    (void)closure;
    if (!self->ok || !self->p.last_error)
        Py_RETURN_NONE;
    return PyUnicode_FromString(rc_err_name(self->p.last_error));
}

static PyObject *ShadowPath_indices(ShadowPathObject *self, void *closure)
{
    (void)closure;
    return Py_BuildValue("{sHsHsHsH}", "next_avail", self->p.next_avail, "shadow_avail_idx", self->p.s_avail_idx,
                         "next_used", self->p.next_used, "guest_used_idx", self->p.g_used_idx);
}

static PyMethodDef ShadowPath_methods[] = {
    {"start", (PyCFunction)ShadowPath_start, METH_NOARGS, "start the native forwarding thread"},
    {"stop", (PyCFunction)ShadowPath_stop, METH_NOARGS, "stop and join the thread (nothing is forwarded after)"},
    {"close", (PyCFunction)ShadowPath_close, METH_NOARGS,
     "stop, then give back every fd and the rings' mappings (end of session; idempotent)"},
    {"drain", (PyCFunction)ShadowPath_drain, METH_NOARGS,
     "move every pending shadow used entry to the guest now (GET_VRING_BASE); returns how many"},
    {"step", (PyCFunction)ShadowPath_step, METH_NOARGS, "one synchronous forwarding pass (stopped path only)"},
    {"set_kick_fd", (PyCFunction)ShadowPath_set_kick_fd, METH_O, "swap the frontend's kick fd (dup'ed; -1 = none)"},
    {"set_call_fd", (PyCFunction)ShadowPath_set_call_fd, METH_O, "swap the frontend's call fd (dup'ed; -1 = none)"},
    {"set_hold_rules", (PyCFunction)ShadowPath_set_hold_rules, METH_O,
     "replace the hold rule table atomically (a sequence of HoldRule; empty: hold nothing)"},
    {"release", (PyCFunction)ShadowPath_release, METH_VARARGS, "release(head): forward a held request / publish a held reply"},
    {"answer", (PyCFunction)ShadowPath_answer, METH_VARARGS, "answer(head, data): complete a held request with data"},
    {"rewrite", (PyCFunction)ShadowPath_rewrite, METH_VARARGS, "rewrite(head, data): publish a held reply as data"},
    {"drop", (PyCFunction)ShadowPath_drop, METH_VARARGS, "drop(head): complete a held reply-less request unforwarded"},
    {"held", (PyCFunction)ShadowPath_held, METH_NOARGS, "held() -> [(head, direction)] held now"},
    {NULL},
};
static PyGetSetDef ShadowPath_getset[] = {
    {"counters", (getter)ShadowPath_counters, NULL, "per-path counters", NULL},
    {"running", (getter)ShadowPath_running, NULL, NULL, NULL},
    {"last_error", (getter)ShadowPath_last_error, NULL, "reason of the last malformed entry, or None", NULL},
    {"indices", (getter)ShadowPath_indices, NULL, "the path's ring indices", NULL},
    {NULL},
};

static PyTypeObject ShadowPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dissectors.ring._ring.ShadowPath",
    .tp_basicsize = sizeof(ShadowPathObject),
    .tp_dealloc = (destructor)ShadowPath_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The shadow-ring data path of one queue, on a native thread.",
    .tp_methods = ShadowPath_methods,
    .tp_getset = ShadowPath_getset,
    .tp_init = (initproc)ShadowPath_init,
    .tp_new = PyType_GenericNew,
};

/* ================================================================== module */

static PyObject *core_layout(void)
{
    return Py_BuildValue(
        "{s{sisisisisi}s{sisisi}s{sisisi}sisisisisisisisis{sisisi}s{si}si}",
        "vring_desc", "size", (int)sizeof(struct rc_vring_desc), "addr", (int)offsetof(struct rc_vring_desc, addr),
        "len", (int)offsetof(struct rc_vring_desc, len), "flags", (int)offsetof(struct rc_vring_desc, flags),
        "next", (int)offsetof(struct rc_vring_desc, next),
        "vring_used_elem", "size", (int)sizeof(struct rc_vring_used_elem), "id",
        (int)offsetof(struct rc_vring_used_elem, id), "len", (int)offsetof(struct rc_vring_used_elem, len),
        "VRING_DESC_F", "NEXT", (int)RC_VRING_DESC_F_NEXT, "WRITE", (int)RC_VRING_DESC_F_WRITE, "INDIRECT",
        (int)RC_VRING_DESC_F_INDIRECT,
        "avail_ring_off", (int)RC_VRING_AVAIL_RING_OFF, "used_ring_off", (int)RC_VRING_USED_RING_OFF,
        "max_queue_size", (int)RC_MAX_QUEUE_SIZE, "max_regions", (int)RC_MAX_REGIONS, "max_gather",
        (int)RC_MAX_GATHER, "cap_hdr_size",
        (int)sizeof(struct rc_cap_hdr), "cap_layout_size", (int)sizeof(struct rc_layout), "layout_f_from_indirect",
        (int)RC_LAYOUT_F_FROM_INDIRECT, "fuse_in_header", "size", (int)RC_FUSE_IN_HEADER_LEN, "opcode",
        (int)RC_FUSE_IN_OPCODE_OFF, "unique", (int)RC_FUSE_IN_UNIQUE_OFF, "fuse_out_header", "size",
        (int)RC_FUSE_OUT_HEADER_LEN, "eio", RC_FUSE_EIO);
}

/* Gathering a batch allocates MBs of bytes objects; with glibc's defaults the freed heap top is handed
 * back to the kernel and page-faulted in again on the next batch (measured: ~6x slower per chain), and
 * every gather above 128 KiB (a 1 MiB WRITE) is a fresh mmap.  Keep both on the heap. */
static PyObject *ring_tune_malloc(PyObject *self, PyObject *args)
{
    (void)self;
    int trim = 128 << 20, mmap_thr = 32 << 20;
    if (!PyArg_ParseTuple(args, "|ii", &trim, &mmap_thr))
        return NULL;
    int ok = mallopt(M_TRIM_THRESHOLD, trim) && mallopt(M_MMAP_THRESHOLD, mmap_thr);
    return PyBool_FromLong(ok);
}

static PyMethodDef ring_functions[] = {
    {"tune_malloc", ring_tune_malloc, METH_VARARGS,
     "tune_malloc(trim_threshold=128 MiB, mmap_threshold=32 MiB) -> bool: glibc mallopt for batch gathers"},
    {NULL},
};

static void ring_free(void *m)
{
    (void)m;
    pool_clear();
    wpool_clear();
}

static PyModuleDef ringmodule = {
    PyModuleDef_HEAD_INIT, "dissectors.ring._ring",
    "C ring engine (ring_core.c) binding; use dissectors.ring, which picks this or the pure-Python twin.", -1,
    ring_functions, NULL, NULL, NULL, (freefunc)ring_free,
};

PyMODINIT_FUNC PyInit__ring(void)
{
    PyObject *common = PyImport_ImportModule("dissectors.ring._common");
    if (!common)
        return NULL;
    RingError = PyObject_GetAttrString(common, "RingError");
    CaptureType = PyObject_GetAttrString(common, "Capture");
    Py_DECREF(common);
    if (!RingError || !CaptureType)
        return NULL;
    if (!(S_answerer = PyUnicode_InternFromString("answerer")) || !(S_fast = PyUnicode_InternFromString("fast")))
        return NULL;
    const char *kinds[4] = {"pad", "request", "reply", "error"};
    for (int i = 0; i < 4; i++)
        if (!(KindNames[i] = PyUnicode_InternFromString(kinds[i])))
            return NULL;
    PyTypeObject *types[] = {&RegionType, &SegType, &MemoryMapType, &ChainType, &SplitQueueType,
                             &CaptureBufferType, &ShadowPathType};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
        if (PyType_Ready(types[i]) < 0)
            return NULL;
    PyObject *m = PyModule_Create(&ringmodule);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "MemoryMap", (PyObject *)&MemoryMapType) < 0 ||
        PyModule_AddObjectRef(m, "Chain", (PyObject *)&ChainType) < 0 ||
        PyModule_AddObjectRef(m, "SplitQueue", (PyObject *)&SplitQueueType) < 0 ||
        PyModule_AddObjectRef(m, "CaptureBuffer", (PyObject *)&CaptureBufferType) < 0 ||
        PyModule_AddObjectRef(m, "ShadowPath", (PyObject *)&ShadowPathType) < 0 ||
        PyModule_AddObjectRef(m, "RingError", RingError) < 0 ||
        PyModule_AddObjectRef(m, "Capture", CaptureType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *lay = core_layout();
    if (!lay || PyModule_AddObject(m, "CORE_LAYOUT", lay) < 0) {
        Py_XDECREF(lay);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *reasons = PyTuple_New(RC_E_COUNT);
    if (!reasons) {
        Py_DECREF(m);
        return NULL;
    }
    for (int i = 0; i < RC_E_COUNT; i++)
        PyTuple_SET_ITEM(reasons, i, PyUnicode_FromString(rc_err_name(i)));
    if (PyModule_AddObject(m, "REASONS", reasons) < 0) {
        Py_DECREF(reasons);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
