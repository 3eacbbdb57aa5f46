/*
 * mmkv._fast: the CPython binding of the per-call read path (db[k], db.get, k in db).
 *
 * Not part of the C core.  This module compiles none of the core's files and links none of
 * its symbols: it calls the core through function pointers that mmkv.engine.shim hands to
 * init() at import, taken from the cffi module (mmkv._native), which holds the only copy of
 * the core in the process (its failpoints, its sync hook, the view's state).  What it saves
 * over the cffi call is the per-call argument conversion and the ffi.unpack: the key's bytes
 * go to the core as they are, and the value comes back as a bytes object built in one copy.
 *
 * Written against the CPython C API that 3.10 to 3.13 all have.  Everything that is not a
 * plain hit or miss (a remap, repair after a dead holder, a lock timeout, damage, a closed
 * handle) returns retry(rc), a new object of the reader's retry type carrying the core's
 * result code: the Store then runs its general path, the one the cffi binding uses.  (The code
 * travels in the returned object, never in a per-thread variable that a signal handler reading
 * the same store between the return and its use could overwrite.)
 *
 * The GIL.  mmkv_get reads lock-free while no writer is active and otherwise waits for the
 * store lock.  That holder may be a thread of this process that needs the GIL to finish (a
 * transaction block, a split, a growth), so waiting with the GIL held could stall it until the
 * lock timeout.  So the first attempt is mmkv_get_nowait, with the GIL held: it never waits
 * (the lock-free read, else the lock only if it is free now, else EBUSY).  Only after EBUSY
 * is the GIL released, around mmkv_get, which may wait.  The uncontended path never pays for
 * releasing the GIL; a reader that has to wait lets every other thread run.  (The turned-down
 * alternative: peek at the sequence word and call mmkv_get with the GIL held when it is even.
 * A writer may take the lock between the peek and mmkv_get's own read, and then we would wait
 * with the GIL held.)
 *
 * Lifetime.  A Reader holds a reference to the cffi object that owns its struct mmkv_view,
 * and a call holds the Reader, so the view is never freed under a call, even one waiting
 * without the GIL while another thread closes the handle: mmkv_view_close waits for calls
 * inside the core and makes later ones return EBADF without touching the mapping.  The Store
 * drops its Reader when it closes and in a forked child (where the mapping is gone), and
 * checks for it before each call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>

#include "mmkv_layout.h"
#include "mmkv_shim.h"

/* Bytes of each thread's buffer the value is first copied into; a larger value is read again
   straight into a bytes object of its size. */
#define FAST_BUFFER (64 * 1024)
/* Reads of a value larger than the buffer that may find its size changed before the general
   path takes over. */
#define SIZE_RETRIES 3

typedef int get_fn(struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct mmkv_getbuf *g);

/* The pointers must have the core's types (checked without referencing the core's symbols). */
_Static_assert(__builtin_types_compatible_p(__typeof__(mmkv_get), get_fn), "mmkv_get's type changed");
_Static_assert(__builtin_types_compatible_p(__typeof__(mmkv_get_nowait), get_fn), "mmkv_get_nowait's type changed");

static get_fn *core_get;         /* the cffi module's mmkv_get: may wait for the lock */
static get_fn *core_get_nowait;  /* the cffi module's mmkv_get_nowait: never waits */

static _Thread_local uint8_t thread_buf[FAST_BUFFER];

/* One lookup: without waiting while the GIL is held, else waiting without it (see above). */
static int lookup(struct mmkv_view *v, const char *key, Py_ssize_t klen, struct mmkv_getbuf *g)
{
    int rc = core_get_nowait(v, (const uint8_t *)key, (uint64_t)klen, g);
    if (rc == EBUSY) {
        Py_BEGIN_ALLOW_THREADS
        rc = core_get(v, (const uint8_t *)key, (uint64_t)klen, g);
        Py_END_ALLOW_THREADS
    }
    return rc;
}

typedef struct {
    PyObject_HEAD
    PyObject *owner;         /* the cffi object owning *view: kept alive as long as this reader */
    struct mmkv_view *view;
    PyObject *retry;         /* called with the result code when the general path must finish */
} Reader;

static PyObject *retry(Reader *self, int rc)
{
    return PyObject_CallFunction(self->retry, "i", rc);
}

static int key_of(PyObject *key, const char **data, Py_ssize_t *len)
{
    if (!PyBytes_Check(key)) {
        PyErr_Format(PyExc_TypeError, "mmkv._fast: key must be bytes, not %.100s", Py_TYPE(key)->tp_name);
        return -1;
    }
    *data = PyBytes_AS_STRING(key);
    *len = PyBytes_GET_SIZE(key);
    return 0;
}

/* A value larger than the thread buffer, read again into a bytes object of its size; NULL
   without an exception set when the key was deleted meanwhile. */
static PyObject *get_large(Reader *self, const char *key, Py_ssize_t klen, uint64_t n)
{
    for (int i = 0; i < SIZE_RETRIES; i++) {
        if (n > (uint64_t)PY_SSIZE_T_MAX)
            return PyErr_NoMemory();
        PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
        if (!out)
            return NULL;
        struct mmkv_getbuf g = {(uint8_t *)PyBytes_AS_STRING(out), n, 0};
        int rc = lookup(self->view, key, klen, &g);
        if (rc == 0 && g.val_len == n)
            return out;
        if (rc == 0) {  /* replaced by a shorter value meanwhile */
            PyObject *exact = PyBytes_FromStringAndSize(PyBytes_AS_STRING(out), (Py_ssize_t)g.val_len);
            Py_DECREF(out);
            return exact;
        }
        Py_DECREF(out);
        if (rc != ENOBUFS)
            return rc == ENOENT ? NULL : retry(self, rc);
        n = g.val_len;  /* replaced by a longer one */
    }
    return retry(self, ENOBUFS);
}

PyDoc_STRVAR(reader_get_doc,
"get(key, default) -> the value (bytes), default when key is absent, or retry(rc) when the\n"
"general path must finish the call (rc: the core's result code).  key: bytes.");

static PyObject *reader_get(Reader *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "get() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    const char *key;
    Py_ssize_t klen;
    if (key_of(args[0], &key, &klen))
        return NULL;
    struct mmkv_getbuf g = {thread_buf, FAST_BUFFER, 0};
    int rc = lookup(self->view, key, klen, &g);
    if (rc == 0)
        return PyBytes_FromStringAndSize((const char *)thread_buf, (Py_ssize_t)g.val_len);
    if (rc == ENOENT) {
        Py_INCREF(args[1]);
        return args[1];
    }
    if (rc == ENOBUFS) {
        PyObject *out = get_large(self, key, klen, g.val_len);
        if (out || PyErr_Occurred())
            return out;
        Py_INCREF(args[1]);   /* deleted meanwhile */
        return args[1];
    }
    return retry(self, rc);
}

PyDoc_STRVAR(reader_contains_doc,
"contains(key) -> True or False, or retry(rc) when the general path must finish the call.\n"
"key: bytes.  Verifies the record like get.");

static PyObject *reader_contains(Reader *self, PyObject *key)
{
    const char *data;
    Py_ssize_t klen;
    if (key_of(key, &data, &klen))
        return NULL;
    /* capacity 0: nothing is copied; a present key gives ENOBUFS (or 0 for an empty value) */
    struct mmkv_getbuf g = {thread_buf, 0, 0};
    int rc = lookup(self->view, data, klen, &g);
    if (rc == 0 || rc == ENOBUFS)
        Py_RETURN_TRUE;
    if (rc == ENOENT)
        Py_RETURN_FALSE;
    return retry(self, rc);
}

static PyObject *reader_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *owner, *addr, *retry_obj;
    static char *names[] = {"owner", "view", "retry", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:Reader", names, &owner, &addr, &retry_obj))
        return NULL;
    if (!core_get || !core_get_nowait) {
        PyErr_SetString(PyExc_RuntimeError, "mmkv._fast: init() was not called");
        return NULL;
    }
    void *view = PyLong_AsVoidPtr(addr);
    if (!view) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "mmkv._fast: the view address is NULL");
        return NULL;
    }
    Reader *self = (Reader *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    Py_INCREF(owner);
    Py_INCREF(retry_obj);
    self->owner = owner;
    self->view = view;
    self->retry = retry_obj;
    return (PyObject *)self;
}

static void reader_dealloc(Reader *self)
{
    Py_XDECREF(self->owner);
    Py_XDECREF(self->retry);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef reader_methods[] = {
    {"get", (PyCFunction)(void (*)(void))reader_get, METH_FASTCALL, reader_get_doc},
    {"contains", (PyCFunction)reader_contains, METH_O, reader_contains_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(reader_doc,
"Reader(owner, view, retry): the read path of one open handle.\n\n"
"owner: the cffi object owning the struct mmkv_view at address view (an int), kept alive\n"
"as long as the reader; retry: called with the core's result code, its result returned, when\n"
"the general path must finish.");

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mmkv._fast.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = reader_doc,
    .tp_methods = reader_methods,
    .tp_new = reader_new,
};

static int pointer_arg(PyObject *obj, get_fn **out)
{
    void *p = PyLong_AsVoidPtr(obj);
    if (!p) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "mmkv._fast.init: a NULL function pointer");
        return -1;
    }
    *out = (get_fn *)p;
    return 0;
}

PyDoc_STRVAR(init_doc,
"init(mmkv_get, mmkv_get_nowait): the addresses (ints) of the C core's functions, taken\n"
"from the cffi module, which holds the one copy of the core.");

static PyObject *fast_init(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "init() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    get_fn *get, *get_nowait;
    if (pointer_arg(args[0], &get) || pointer_arg(args[1], &get_nowait))
        return NULL;
    core_get = get;
    core_get_nowait = get_nowait;
    Py_RETURN_NONE;
}

static PyMethodDef fast_methods[] = {
    {"init", (PyCFunction)(void (*)(void))fast_init, METH_FASTCALL, init_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fast_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mmkv._fast",
    .m_doc = "CPython binding of mmkv's per-call read path; calls the C core of mmkv._native.",
    .m_size = -1,
    .m_methods = fast_methods,
};

PyMODINIT_FUNC PyInit__fast(void)
{
    if (PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fast_module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Reader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
