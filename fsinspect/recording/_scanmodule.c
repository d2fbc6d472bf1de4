/*
 * fsinspect.recording._scan: the thin CPython binding over scan_core.c (twin: scan.py).
 *
 * configure(**constants) once, from scan.py, with the format's values; then
 * scan(buf, pos, base, n_ifaces, max_block) -> (rows, pos): a scan.Row per canonical packet block
 * (offset, iface, inbound, ts_ns, data, orig_len, queue, head, epoch, flags, n), head None for none.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "scan_core.h"

#define CHUNK 256

static struct sc_config config;
static int configured;
static PyTypeObject *row_type; /* scan.Row, a tuple subclass */

static PyObject *scan_configure(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *names[] = {"prefix_in", "prefix_out", "bt_epb", "opt_epb_flags", "opt_custom_bin",
                            "opt_end", "meta_record", "meta_number", "meta_record_size", "meta_number_size", "pen",
                            "no_head", "dir_mask", "dir_inbound", "rf_snapped", "tail", "tail_n", "row_type", NULL};
    Py_buffer in, out;
    PyObject *rt;
    unsigned int bt, o1, o2, o3, m1, m2, s1, s2, pen, nh, dm, di, rs, tail, tail_n;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*y*IIIIIIIIIIIIIIIO", names, &in, &out, &bt, &o1, &o2, &o3,
                                     &m1, &m2, &s1, &s2, &pen, &nh, &dm, &di, &rs, &tail, &tail_n, &rt))
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
    config.meta_record_size = (uint16_t)s1;
    config.meta_number_size = (uint16_t)s2;
    config.pen = pen;
    config.no_head = nh;
    config.dir_mask = dm;
    config.dir_inbound = di;
    config.rf_snapped = rs;
    configured = 1;
    Py_RETURN_NONE;
}

static PyObject *row_tuple(const struct sc_row *r, const uint8_t *buf)
{
    PyObject *t = row_type->tp_alloc(row_type, 11);
    if (!t)
        return NULL;
    PyObject *items[11] = {
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
    };
    for (int i = 0; i < 11; i++) {
        if (!items[i]) {
            for (int j = i; j < 11; j++)
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

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))scan_configure, METH_VARARGS | METH_KEYWORDS,
     "configure(**constants): the format's values (scan.py passes them)"},
    {"scan", scan_scan, METH_VARARGS, "scan(buf, pos, base, n_ifaces, max_block) -> (rows, pos)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fsinspect.recording._scan",
                                    "Canonical pcapng packet blocks to rows, in C (twin: scan.py).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__scan(void)
{
    return PyModule_Create(&module);
}
