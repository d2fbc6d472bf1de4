/*
 * fsinspect.recording._scan: the thin CPython binding over scan_core.c (twin: scan.py).
 *
 * configure(**constants) once, from scan.py, with the format's values; then
 * scan(buf, pos, base, n_ifaces, max_block) -> (rows, pos): a scan.Row per canonical packet block
 * (offset, iface, inbound, ts_ns, data, orig_len, queue, head, epoch, flags, n, layout), head None for none,
 * layout the descriptor items' bytes or None;
 * frame(items, start, ifaces, epoch, max_len) -> (blocks, next): a packet block per capture item
 * (inbound, data, queue, head, ts_ns, orig_len, notes, flags, n[, layout]) from `start`, stopping in front of
 * one the writer must make itself (scan.py frame_python says which).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "scan_core.h"

#define CHUNK 256
#define MAX_NOTES 16
#define MAX_DESCS 64 /* a longer descriptor layout is framed by the writer */

static struct sc_config config;
static int configured;
static unsigned long rf_debugger, op_init;
static PyTypeObject *row_type; /* scan.Row, a tuple subclass */

static PyObject *scan_configure(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *names[] = {"prefix_in", "prefix_out", "bt_epb", "opt_epb_flags", "opt_custom_bin",
                            "opt_end", "meta_record", "meta_number", "meta_record_size", "meta_number_size", "pen",
                            "no_head", "dir_mask", "dir_inbound", "rf_snapped", "tail", "tail_n", "row_type",
                            "dir_outbound", "opt_comment", "rf_debugger", "op_init", "meta_layout", NULL};
    Py_buffer in, out;
    PyObject *rt;
    unsigned int bt, o1, o2, o3, m1, m2, s1, s2, pen, nh, dm, di, rs, tail, tail_n, dout, oc, rd, oi, ml;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*y*IIIIIIIIIIIIIIIOIIIII", names, &in, &out, &bt, &o1, &o2, &o3,
                                     &m1, &m2, &s1, &s2, &pen, &nh, &dm, &di, &rs, &tail, &tail_n, &rt, &dout, &oc,
                                     &rd, &oi, &ml))
        return NULL;
    int ok = in.len == out.len && in.len <= SC_MAX_PREFIX && tail == SC_TAIL && tail_n == SC_TAIL_N
             && PyType_Check(rt) && PyType_IsSubtype((PyTypeObject *)rt, &PyTuple_Type);
    if (ok) {
        memcpy(config.prefix[0], in.buf, (size_t)in.len);
        memcpy(config.prefix[1], out.buf, (size_t)out.len);
        config.prefix_len = (uint32_t)in.len;
    }
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "the packet layout differs from the one scan_core.c was built for");
        return NULL;
    }
    Py_XSETREF(row_type, (PyTypeObject *)Py_NewRef(rt));
    config.bt_epb = bt;
    config.opt_epb_flags = (uint16_t)o1;
    config.opt_custom_bin = (uint16_t)o2;
    config.opt_end = (uint16_t)o3;
    config.meta_record = (uint16_t)m1;
    config.meta_number = (uint16_t)m2;
    config.meta_layout = (uint16_t)ml;
    config.meta_record_size = (uint16_t)s1;
    config.meta_number_size = (uint16_t)s2;
    config.pen = pen;
    config.no_head = nh;
    config.dir_mask = dm;
    config.dir_inbound = di;
    config.rf_snapped = rs;
    config.dir_outbound = dout;
    config.opt_comment = (uint16_t)oc;
    rf_debugger = rd;
    op_init = oi;
    configured = 1;
    Py_RETURN_NONE;
}

static PyObject *row_tuple(const struct sc_row *r, const uint8_t *buf)
{
    PyObject *t = row_type->tp_alloc(row_type, 12);
    if (!t)
        return NULL;
    PyObject *items[12] = {
        PyLong_FromUnsignedLongLong(r->offset),
        PyLong_FromUnsignedLong(r->iface),
        Py_NewRef(r->inbound ? Py_True : Py_False),
        PyLong_FromUnsignedLongLong(r->ts),
        PyBytes_FromStringAndSize((const char *)buf + r->pdu_off, (Py_ssize_t)r->pdu_len),
        PyLong_FromLongLong(r->orig_len),
        PyLong_FromUnsignedLong(r->queue),
        r->head == config.no_head ? Py_NewRef(Py_None) : PyLong_FromUnsignedLong(r->head),
        PyLong_FromUnsignedLong(r->epoch),
        PyLong_FromUnsignedLong(r->flags),
        PyLong_FromUnsignedLongLong(r->n),
        r->has_layout ? PyBytes_FromStringAndSize((const char *)buf + r->layout_off, (Py_ssize_t)r->layout_len)
                      : Py_NewRef(Py_None),
    };
    for (int i = 0; i < 12; i++) {
        if (!items[i]) {
            for (int j = i; j < 12; j++)
                Py_XDECREF(items[j]);
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, items[i]);
    }
    return t;
}

static PyObject *scan_scan(PyObject *self, PyObject *args)
{
    Py_buffer b;
    Py_ssize_t pos;
    unsigned long long base;
    unsigned int n_ifaces, max_block;
    struct sc_row rows[CHUNK];
    (void)self;
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "scan: configure() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*nKII", &b, &pos, &base, &n_ifaces, &max_block))
        return NULL;
    if (pos < 0 || pos > b.len) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "scan: pos outside the buffer");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    size_t p = (size_t)pos;
    struct sc_config c = config;
    c.max_block = max_block;
    while (out) {
        size_t k = sc_scan(&c, b.buf, (size_t)b.len, &p, (uint64_t)base, n_ifaces, rows, CHUNK);
        for (size_t i = 0; i < k; i++) {
            PyObject *t = row_tuple(&rows[i], b.buf);
            if (!t || PyList_Append(out, t) < 0) {
                Py_XDECREF(t);
                Py_CLEAR(out);
                break;
            }
            Py_DECREF(t);
        }
        if (k < CHUNK)
            break;
    }
    PyBuffer_Release(&b);
    if (!out)
        return NULL;
    return Py_BuildValue("(Nn)", out, (Py_ssize_t)p);
}

/* An unsigned int item of at most `max`, or -1 (no exception left set): the caller stops there. */
static long long small_uint(PyObject *o, unsigned long long max)
{
    if (!PyLong_CheckExact(o))
        return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return v > max ? -1 : (long long)v;
}

/* One capture item as an sc_packet; 0 if it can be framed here, -1 if the writer must make it (no exception),
 * -2 on an error (exception set). */
static int packet_of(PyObject *item, PyObject *ifaces, unsigned long epoch, Py_ssize_t max_len, struct sc_packet *p,
                     const char **notes, uint16_t *note_lens, uint8_t *layout)
{
    if (!PyTuple_CheckExact(item) || (PyTuple_GET_SIZE(item) != 9 && PyTuple_GET_SIZE(item) != 10))
        return -1;
    /* The descriptor layout: a tuple of (len, flags) tuples, packed as the writer's META_LAYOUT items. */
    PyObject *lay = PyTuple_GET_SIZE(item) == 10 ? PyTuple_GET_ITEM(item, 9) : Py_None;
    uint32_t layout_len = 0;
    if (lay != Py_None) {
        if (!PyTuple_CheckExact(lay) || PyTuple_GET_SIZE(lay) > MAX_DESCS)
            return -1;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(lay); i++) {
            PyObject *d = PyTuple_GET_ITEM(lay, i);
            if (!PyTuple_CheckExact(d) || PyTuple_GET_SIZE(d) != 2)
                return -1;
            long long ln = small_uint(PyTuple_GET_ITEM(d, 0), 0xFFFFFFFFu), fl = small_uint(PyTuple_GET_ITEM(d, 1), 0xFFFF);
            if (ln < 0 || fl < 0)
                return -1;
            uint8_t *o = layout + 8 * i;
            for (int k = 0; k < 4; k++)
                o[k] = (uint8_t)((unsigned long long)ln >> (8 * k));
            o[4] = (uint8_t)fl;
            o[5] = (uint8_t)(fl >> 8);
            o[6] = o[7] = 0;
        }
        layout_len = (uint32_t)(8 * PyTuple_GET_SIZE(lay));
    }
    PyObject *data = PyTuple_GET_ITEM(item, 1), *head = PyTuple_GET_ITEM(item, 3), *nl = PyTuple_GET_ITEM(item, 6);
    PyObject *ts_o = PyTuple_GET_ITEM(item, 4), *orig_o = PyTuple_GET_ITEM(item, 5), *n_o = PyTuple_GET_ITEM(item, 8);
    if (!PyBytes_CheckExact(data) || PyBytes_GET_SIZE(data) > max_len || !PyList_CheckExact(nl)
        || PyList_GET_SIZE(nl) > MAX_NOTES)
        return -1;
    int inbound = PyObject_IsTrue(PyTuple_GET_ITEM(item, 0));
    if (inbound < 0)
        return -2;
    long long queue = small_uint(PyTuple_GET_ITEM(item, 2), 0xFFFF);
    long long flags = small_uint(PyTuple_GET_ITEM(item, 7), 0xFFFF);
    long long h = head == Py_None ? (long long)config.no_head : small_uint(head, 0xFFFFFFFFu);
    if (queue < 0 || flags < 0 || h < 0 || (flags & (long long)rf_debugger) || !PyLong_CheckExact(ts_o)
        || !PyLong_CheckExact(n_o) || !PyLong_CheckExact(orig_o))
        return -1;
    unsigned long long ts = PyLong_AsUnsignedLongLong(ts_o), n = PyLong_AsUnsignedLongLong(n_o);
    long long orig = PyLong_AsLongLong(orig_o);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    const uint8_t *buf = (const uint8_t *)PyBytes_AS_STRING(data);
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    if (inbound && len >= 8 && (buf[4] | buf[5] << 8 | buf[6] << 16 | (unsigned long)buf[7] << 24) == op_init)
        return -1; /* a new INIT epoch: the writer counts it */
    PyObject *iface = PyDict_GetItemWithError(ifaces, PyTuple_GET_ITEM(item, 2));
    if (!iface)
        return PyErr_Occurred() ? -2 : -1; /* a queue without its interface block yet */
    long long ifc = small_uint(iface, 0xFFFFFFFFu);
    if (ifc < 0)
        return -1;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(nl); i++) {
        PyObject *note = PyList_GET_ITEM(nl, i);
        Py_ssize_t size;
        const char *text = PyUnicode_CheckExact(note) ? PyUnicode_AsUTF8AndSize(note, &size) : NULL;
        if (!text) {
            PyErr_Clear(); /* (not UTF-8: the writer says so) */
            return -1;
        }
        if (size > 0xFFFF)
            return -1;
        notes[i] = text;
        note_lens[i] = (uint16_t)size;
    }
    *p = (struct sc_packet){.data = buf, .len = (uint64_t)len, .orig_len = orig > len ? (uint64_t)orig : (uint64_t)len,
                            .ts = ts, .n = n, .iface = (uint32_t)ifc, .head = (uint32_t)h, .epoch = (uint32_t)epoch,
                            .queue = (uint16_t)queue, .flags = (uint16_t)flags, .inbound = (uint8_t)inbound,
                            .n_notes = (uint32_t)PyList_GET_SIZE(nl), .notes = notes, .note_lens = note_lens,
                            .layout = layout, .layout_len = layout_len};
    return sc_frame_len(&config, p) ? 0 : -1;
}

static PyObject *scan_frame(PyObject *self, PyObject *args)
{
    PyObject *items, *ifaces;
    Py_ssize_t start, max_len;
    unsigned long epoch;
    (void)self;
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "frame: configure() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!nO!kn", &PyList_Type, &items, &start, &PyDict_Type, &ifaces, &epoch, &max_len))
        return NULL;
    PyObject *out = PyList_New(0);
    Py_ssize_t i = start < 0 ? 0 : start;
    for (; out && i < PyList_GET_SIZE(items); i++) {
        struct sc_packet p;
        const char *notes[MAX_NOTES];
        uint16_t note_lens[MAX_NOTES];
        uint8_t layout[8 * MAX_DESCS];
        int r = packet_of(PyList_GET_ITEM(items, i), ifaces, epoch, max_len, &p, notes, note_lens, layout);
        if (r == -1)
            break;
        PyObject *blk = r == 0 ? PyBytes_FromStringAndSize(NULL, (Py_ssize_t)sc_frame_len(&config, &p)) : NULL;
        if (blk)
            sc_frame(&config, &p, (uint8_t *)PyBytes_AS_STRING(blk));
        if (!blk || PyList_Append(out, blk) < 0)
            Py_CLEAR(out);
        Py_XDECREF(blk);
    }
    if (!out)
        return NULL;
    return Py_BuildValue("(Nn)", out, i);
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))scan_configure, METH_VARARGS | METH_KEYWORDS,
     "configure(**constants): the format's values (scan.py passes them)"},
    {"scan", scan_scan, METH_VARARGS, "scan(buf, pos, base, n_ifaces, max_block) -> (rows, pos)"},
    {"frame", scan_frame, METH_VARARGS, "frame(items, start, ifaces, epoch, max_len) -> (blocks, next)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fsinspect.recording._scan",
                                    "Canonical pcapng packet blocks to rows and back, in C (twin: scan.py).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__scan(void)
{
    return PyModule_Create(&module);
}
