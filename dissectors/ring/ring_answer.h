/*
 * ring_answer.h: the C-to-C interface between the ring engine's SplitQueue.serve_fast() and a native
 * answerer (the passthrough daemon's FastPath, daemon/passthrough/_fastmodule.c).
 *
 * The answerer object has an attribute `answerer`: a PyCapsule named RC_ANSWERER_CAPSULE whose pointer
 * is a `struct rc_answerer`.  serve_fast() calls `answer` for each popped chain with the GIL held,
 * without making a Chain object: the request's bytes (gathered) and the chain's device-writable guest
 * buffers as an iovec.  The ring engine keeps the buffers' regions mapped for the call (the answerer may
 * release the GIL while it writes into them).
 *
 * `answer` returns a new reference:
 * - bytes: the reply, which the engine scatters into the writable buffers (in order), then
 *   `*in_place` bytes the answerer already wrote there after the reply's length (a zero-copy READ's
 *   data; 0 otherwise);
 * - b"": served, no reply (the chain completes with used.len 0);
 * - None: declined, nothing changed (the engine hands the chain to Python);
 * - NULL with an exception set: it failed (the engine calls the caller's `failed` as Python would).
 *
 * `answer_iov` (added later: present when `size` covers it) is the same for a request longer than the
 * engine gathers on its stack: `head` holds its first `hlen` bytes, gathered, and `rd` (`nrd` entries) the
 * rest of its readable bytes where they are in guest memory, `len` bytes in all.  A WRITE's data is written
 * from there (no copy of it in between); the engine keeps those regions mapped for the call too.  It
 * returns what `answer` returns, or NULL with no exception set: "gather it": the engine then gathers the
 * whole request and calls `answer`.
 *
 * Callers check `version` and `size` before use; fields are only ever added at the end.
 */
#ifndef FSINSPECT_RING_ANSWER_H
#define FSINSPECT_RING_ANSWER_H

#include <Python.h>
#include <stddef.h>
#include <sys/uio.h>

#define RC_ANSWERER_CAPSULE "fsinspect.ring.answerer"
#define RC_ANSWERER_VERSION 1

struct rc_answerer {
    unsigned int version;
    unsigned int size; /* sizeof(struct rc_answerer) as the answerer was built */
    PyObject *(*answer)(PyObject *self, const char *req, size_t len, const struct iovec *wr, int nwr,
                        size_t *in_place);
    PyObject *(*answer_iov)(PyObject *self, const char *head, size_t hlen, const struct iovec *rd, int nrd,
                            size_t len, const struct iovec *wr, int nwr, size_t *in_place);
};

/* Whether the answerer `a` (version and size checked) has answer_iov. */
#define RC_ANSWERER_HAS_IOV(a) \
    ((a)->size >= offsetof(struct rc_answerer, answer_iov) + sizeof(void *) && (a)->answer_iov != NULL)

#endif
