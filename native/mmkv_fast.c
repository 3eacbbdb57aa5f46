/*
 * mmkv._fast: the CPython binding of the per-call operations.
 *
 * It defines one type, Handle, the base class of mmkv.Store when the extension is built.  Its
 * type slots and methods are the hot calls: db[k], db.get, k in db, len(db), db[k] = v,
 * del db[k], db.pop, db.incr, and the loop of db.update (_put_pairs).  So db[k] reaches C
 * through the mapping slot with no Python frame in between, the key's bytes go to the core as
 * they are, and a value is copied once, from the mapping straight into the bytes object
 * returned (the core asks for it, through the getbuf's alloc hook, once it knows the length).
 *
 * Not part of the C core.  This module compiles none of the core's files and links none of
 * its symbols: it calls the core through the table of function pointers that
 * mmkv.engine.shim hands to init() at import, taken from the cffi module (mmkv._native),
 * which holds the only copy of the core in the process (its failpoints, its sync hook).
 *
 * What stays in Python.  Everything that is not a plain hit, miss or write: a remap after
 * another process grew the file, growth on ENOSPC, an index split, repair after a dead lock
 * holder, lock reports and timeouts, damage, calls inside db.lock() or a transaction, closed
 * and forked handles.  For those a call hands the core's result code to a method of the
 * Python subclass (the general path the cffi binding also uses):
 *   _dead() -> exception          the handle is closed or forked (the view is unbound)
 *   _read_slow(rc, k) -> value or None
 *   _contains_slow(rc, k) -> bool
 *   _put_slow(rc, k, val)          rc None: not tried (this handle holds the lock)
 *   _delete_slow(rc, k) -> bool    False: absent
 *   _pop_slow(rc, k) -> value or None
 *   _incr_slow(rc, k, delta) -> int   also every delta that is not an int in int64 range
 *   _len_slow() -> int
 *   _make_room(rc, k, val, grew_for) -> grew_for   (_put_pairs, lock held: grow or split)
 *   _reserve_for(n, nbytes)        (_put_pairs, lock held: n pairs of nbytes of records follow)
 *   _writable()                    raises ReadOnlyError
 * k and val are bytes.  The code travels in the arguments, never in a per-thread variable that
 * a signal handler using the same store could overwrite between the return and its use.
 *
 * The GIL.  A call that may wait for the store lock first tries without waiting, with the GIL
 * held (mmkv_get_nowait; the fused writes with MMKV_TRY_LOCK; mmkv_count_nowait).  The lock's
 * holder may be a thread of this process that needs the GIL to finish (a transaction block, a
 * split, a growth), so only after EBUSY is the GIL released, around the call that waits.  The
 * uncontended path never pays for releasing the GIL; a call that has to wait lets every other
 * thread run.
 *
 * Lifetime.  The handle's view (struct mmkv_view) belongs to a cffi object, `owner`, that the
 * Handle references while bound.  While a call holds the GIL nothing can unbind it; around a
 * wait without the GIL the call holds its own reference to owner, so the view is never freed
 * under it even if another thread closes the handle meanwhile (mmkv_view_close waits for calls
 * inside the core and makes later ones return EBADF without touching the mapping).  After a
 * Python callback a call re-reads the view.  The Store unbinds when it closes and in a forked
 * child (where the mapping is gone).
 *
 * Written against the CPython C API that 3.10 to 3.13 all have.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>

#include "mmkv_layout.h"
#include "mmkv_shim.h"

/* Bytes of each thread's buffer a value is first copied into; a larger value is read again
   straight into a bytes object of its size. */
#define FAST_BUFFER (64 * 1024)
/* Reads of a value larger than the buffer that may find its size changed before the general
   path takes over. */
#define SIZE_RETRIES 3

/* ------------------------------------------------------------------ the core, through pointers */

typedef int get_fn(struct mmkv_view *, const uint8_t *, uint64_t, struct mmkv_getbuf *);
typedef int put_fn(struct mmkv_view *, const uint8_t *, uint64_t, const uint8_t *, uint64_t, uint32_t, int);
typedef int delete_fn(struct mmkv_view *, const uint8_t *, uint64_t, int);
typedef int take_fn(struct mmkv_view *, const uint8_t *, uint64_t, struct mmkv_getbuf *, int);
typedef int incr_fn(struct mmkv_view *, const uint8_t *, uint64_t, int64_t, int64_t *, int);
typedef int count_fn(struct mmkv_view *, uint64_t *);
typedef int many_fn(struct mmkv_view *, const uint8_t *, const uint64_t *, uint64_t, struct mmkv_getbuf *,
                    uint64_t *, uint8_t *, int);
typedef int cas_fn(struct mmkv_view *, const uint8_t *, uint64_t, const uint8_t *, uint64_t, int, const uint8_t *,
                   uint64_t, int, int);

/* The pointers must have the core's types (checked without referencing the core's symbols). */
#define SAME_TYPE(fn, type) _Static_assert(__builtin_types_compatible_p(__typeof__(fn), type), #fn "'s type changed")
SAME_TYPE(mmkv_get, get_fn);
SAME_TYPE(mmkv_get_nowait, get_fn);
SAME_TYPE(mmkv_put, put_fn);
SAME_TYPE(mmkv_delete, delete_fn);
SAME_TYPE(mmkv_take, take_fn);
SAME_TYPE(mmkv_incr, incr_fn);
SAME_TYPE(mmkv_count_nowait, count_fn);
SAME_TYPE(mmkv_cas, cas_fn);
SAME_TYPE(mmkv_get_many, many_fn);

/* init() receives the addresses in this order (exported as CORE_FUNCTIONS). */
static const char *const core_names[] = {
    "mmkv_get", "mmkv_get_nowait", "mmkv_put", "mmkv_delete", "mmkv_take", "mmkv_incr", "mmkv_count_nowait",
    "mmkv_cas", "mmkv_get_many",
};
#define N_CORE (sizeof(core_names) / sizeof(core_names[0]))

static struct {
    get_fn *get;            /* may wait for the lock */
    get_fn *get_nowait;     /* never waits */
    put_fn *put;
    delete_fn *delete_;
    take_fn *take;
    incr_fn *incr;
    count_fn *count_nowait;
    cas_fn *cas;
    many_fn *get_many;
} core;

/* Set by init(): the limits and the error class of mmkv. */
static PyObject *limit_error;
static uint64_t max_key_size, max_value_size;

static _Thread_local uint8_t thread_buf[FAST_BUFFER];

/* Interned names of the Python subclass's general-path methods. */
static PyObject *s_dead, *s_read_slow, *s_contains_slow, *s_put_slow, *s_delete_slow, *s_pop_slow,
    *s_incr_slow, *s_len_slow, *s_make_room, *s_reserve_for, *s_writable, *s_items, *s_cas_slow, *s_get_many_slow,
    *s_reap;

typedef struct {
    PyObject_HEAD
    PyObject *owner;            /* the cffi object owning *view, while bound */
    struct mmkv_view *view;     /* NULL: closed, forked or not yet opened */
    int readonly;
} Handle;

/* ------------------------------------------------------------------ arguments */

/* The bytes of a key or value: bytes (and subclasses) as they are, str as its UTF-8 (cached in
   the str), bytearray and memoryview copied into a new bytes (*tmp, which the caller releases:
   their contents may change while the GIL is released).  what: "key" or "value". */
static int bytes_of(PyObject *obj, const char *what, const char **data, Py_ssize_t *len, PyObject **tmp)
{
    *tmp = NULL;
    if (PyBytes_Check(obj)) {
        *data = PyBytes_AS_STRING(obj);
        *len = PyBytes_GET_SIZE(obj);
        return 0;
    }
    if (PyUnicode_Check(obj)) {
        *data = PyUnicode_AsUTF8AndSize(obj, len);
        return *data ? 0 : -1;
    }
    if (PyByteArray_Check(obj) || PyMemoryView_Check(obj)) {
        PyObject *copy = PyBytes_FromObject(obj);
        if (!copy)
            return -1;
        *tmp = copy;
        *data = PyBytes_AS_STRING(copy);
        *len = PyBytes_GET_SIZE(copy);
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "mmkv %ss must be bytes or str, not %.100s", what, Py_TYPE(obj)->tp_name);
    return -1;
}

/* A key or value as a bytes object for the general path (a new reference). */
static PyObject *bytes_object(PyObject *obj, const char *data, Py_ssize_t len)
{
    if (PyBytes_CheckExact(obj)) {
        Py_INCREF(obj);
        return obj;
    }
    return PyBytes_FromStringAndSize(data, len);
}

static int check_sizes(Py_ssize_t klen, Py_ssize_t vlen)
{
    if ((uint64_t)klen > max_key_size) {
        PyErr_Format(limit_error, "key of %zd bytes is longer than the %llu-byte limit", klen,
                     (unsigned long long)max_key_size);
        return -1;
    }
    if ((uint64_t)vlen > max_value_size) {
        PyErr_Format(limit_error, "value of %zd bytes is longer than the %llu-byte limit", vlen,
                     (unsigned long long)max_value_size);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ calling the general path */

/* Raise what self._dead() returns (the handle is closed or forked); NULL. */
static PyObject *raise_dead(Handle *self)
{
    PyObject *exc = PyObject_CallMethodNoArgs((PyObject *)self, s_dead);
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* The result code for the general path: an int, or None when the fast call was not tried. */
static PyObject *rc_object(int rc)
{
    if (rc < 0)
        Py_RETURN_NONE;
    return PyLong_FromLong(rc);
}

/* self.<name>(rc, key bytes[, more]) */
static PyObject *call_slow(Handle *self, PyObject *name, int rc, PyObject *key, const char *k, Py_ssize_t klen,
                           PyObject *more)
{
    PyObject *code = rc_object(rc), *kb = code ? bytes_object(key, k, klen) : NULL, *out = NULL;
    if (kb) {
        PyObject *args[4] = {(PyObject *)self, code, kb, more};
        out = PyObject_VectorcallMethod(name, args, (more ? 4 : 3), NULL);
    }
    Py_XDECREF(code);
    Py_XDECREF(kb);
    return out;
}

#define NOT_TRIED (-1)

/* ------------------------------------------------------------------ core calls and the GIL */

/* The getbuf alloc hook (called by the core with the GIL held): a bytes object of exactly n bytes
   for the value, in *ctx (a PyObject *; one made by an earlier call of a read that was thrown
   away is released).  NULL (with the exception set) when it cannot be made. */
static uint8_t *alloc_bytes(void *ctx, uint64_t n)
{
    PyObject **made = ctx;
    Py_CLEAR(*made);
    if (PyErr_Occurred() || n > (uint64_t)PY_SSIZE_T_MAX)
        return NULL;
    *made = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    return *made ? (uint8_t *)PyBytes_AS_STRING(*made) : NULL;
}

/* An output for a read that builds the value's bytes object straight from the mapping: the core
   calls alloc_bytes once it knows the length (values up to FAST_BUFFER; larger ones give ENOBUFS
   and are read by get_large); an empty value needs no object of its own. */
#define DIRECT_GETBUF(made) {.buf = thread_buf, .cap = 0, .alloc = alloc_bytes, .alloc_ctx = (made), .alloc_max = FAST_BUFFER}

/* The value of a read that returned 0 into g (a new reference): the object alloc_bytes made, or
   a copy of the buffer (an empty value, or a read that waited, which cannot make objects). */
static PyObject *value_from(struct mmkv_getbuf *g, PyObject **made)
{
    PyObject *obj = *made;
    *made = NULL;
    if (g->alloc && g->val_len && obj)
        return obj;
    Py_XDECREF(obj);
    return PyBytes_FromStringAndSize((const char *)g->buf, (Py_ssize_t)g->val_len);
}

/* One lookup: without waiting while the GIL is held, else waiting without it (see above); a
   wait copies into the thread's buffer instead of calling g's alloc hook, which needs the GIL. */
static int lookup(Handle *self, struct mmkv_view *v, const char *key, Py_ssize_t klen, struct mmkv_getbuf *g)
{
    int rc = core.get_nowait(v, (const uint8_t *)key, (uint64_t)klen, g);
    if (rc == EBUSY) {
        if (g->alloc) {
            g->alloc = NULL;
            g->buf = thread_buf;
            g->cap = FAST_BUFFER;
        }
        PyObject *owner = self->owner;
        Py_INCREF(owner);
        Py_BEGIN_ALLOW_THREADS
        rc = core.get(v, (const uint8_t *)key, (uint64_t)klen, g);
        Py_END_ALLOW_THREADS
        Py_DECREF(owner);
    }
    return rc;
}

/* Run a core call that takes the lock itself (a fused write, a batch read) with take
   MMKV_TRY_LOCK (never waits), then, after EBUSY, with MMKV_TAKE_LOCK and the GIL released;
   `call` uses the variable take. */
#define FUSED(self, rc, call)                                  \
    do {                                                       \
        int take = MMKV_TRY_LOCK;                              \
        rc = (call);                                           \
        if (rc == EBUSY) {                                     \
            PyObject *owner_ = (self)->owner;                  \
            Py_INCREF(owner_);                                 \
            take = MMKV_TAKE_LOCK;                             \
            Py_BEGIN_ALLOW_THREADS                             \
            rc = (call);                                       \
            Py_END_ALLOW_THREADS                               \
            Py_DECREF(owner_);                                 \
        }                                                      \
    } while (0)

/* ------------------------------------------------------------------ reads */

/* A value larger than the thread buffer, read again into a bytes object of its size; NULL
   without an exception set when the key was deleted meanwhile; *slow set (and NULL returned)
   when the general path must finish with that code. */
static PyObject *get_large(Handle *self, struct mmkv_view *v, const char *key, Py_ssize_t klen, uint64_t n,
                           int *slow)
{
    for (int i = 0; i < SIZE_RETRIES; i++) {
        if (n > (uint64_t)PY_SSIZE_T_MAX)
            return PyErr_NoMemory();
        PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
        if (!out)
            return NULL;
        struct mmkv_getbuf g = {.buf = (uint8_t *)PyBytes_AS_STRING(out), .cap = n};
        int rc = lookup(self, v, key, klen, &g);
        if (rc == 0 && g.val_len == n)
            return out;
        if (rc == 0) { /* replaced by a shorter value meanwhile */
            PyObject *exact = PyBytes_FromStringAndSize(PyBytes_AS_STRING(out), (Py_ssize_t)g.val_len);
            Py_DECREF(out);
            return exact;
        }
        Py_DECREF(out);
        if (rc == ENOENT)
            return NULL;
        if (rc != ENOBUFS) {
            *slow = rc;
            return NULL;
        }
        n = g.val_len; /* replaced by a longer one */
    }
    *slow = ENOBUFS;
    return NULL;
}

/* A lock-free read found key's record expired (g->expired): Store._reap reclaims it if the lock is
   free now.  0, or -1 with an exception set. */
static int reap(Handle *self, PyObject *key)
{
    PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, s_reap, key);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

/* The value of key (a new reference); NULL without an exception set when the key is absent, with
   one on an error. */
static PyObject *read_value(Handle *self, PyObject *key)
{
    const char *k;
    Py_ssize_t klen;
    PyObject *tmp, *out = NULL;
    if (bytes_of(key, "key", &k, &klen, &tmp))
        return NULL;
    struct mmkv_view *v = self->view;
    int rc = NOT_TRIED;
    if (!v) {
        raise_dead(self);
        goto done;
    }
    if (!v->held) {
        PyObject *made = NULL;
        struct mmkv_getbuf g = DIRECT_GETBUF(&made);
        rc = lookup(self, v, k, klen, &g);
        if (rc == 0) {
            out = value_from(&g, &made);
            goto done;
        }
        Py_CLEAR(made);
        if (rc == ENOENT && g.expired)
            reap(self, key);          /* (an exception it raises is the caller's) */
        if (rc == ENOENT || PyErr_Occurred())
            goto done;
        if (rc == ENOBUFS) {
            rc = NOT_TRIED;
            out = get_large(self, v, k, klen, g.val_len, &rc);
            if (out || PyErr_Occurred() || rc == NOT_TRIED) /* NOT_TRIED: deleted meanwhile */
                goto done;
        }
    }
    out = call_slow(self, s_read_slow, rc, key, k, klen, NULL);
    if (out == Py_None)
        Py_CLEAR(out);
done:
    Py_XDECREF(tmp);
    return out;
}

static PyObject *handle_subscript(Handle *self, PyObject *key)
{
    PyObject *out = read_value(self, key);
    if (!out && !PyErr_Occurred())
        PyErr_SetObject(PyExc_KeyError, key);
    return out;
}

PyDoc_STRVAR(get_doc,
"get(key, default=None) -> the value of key (bytes), or default when it is absent (never KeyError).\n\n"
"Lock-free while no writer is active, else waits for the lock (up to lock_timeout, the GIL\n"
"released).  :raises TypeError: key is not bytes or str.");

/* The arguments of a call that takes one argument (positional, or named `name`) and an optional
   default (positional, or named "default"; None when not given): 0, or -1 when they do not fit. */
static int one_and_default(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *name,
                           PyObject **first, PyObject **dflt)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    *first = nargs >= 1 ? args[0] : NULL;
    *dflt = nargs == 2 ? args[1] : Py_None;
    if (nargs + nkw < 1 || nargs + nkw > 2 || nargs > 2)
        return -1;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *kw = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(kw, "default") == 0 && nargs < 2)
            *dflt = args[nargs + i];
        else if (PyUnicode_CompareWithASCIIString(kw, name) == 0 && nargs < 1)
            *first = args[nargs + i];
        else
            return -1;
    }
    return *first ? 0 : -1;
}

static PyObject *handle_get(Handle *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *key, *dflt;
    if (one_and_default(args, nargs, kwnames, "key", &key, &dflt))
        goto usage;
    PyObject *out = read_value(self, key);
    if (!out && !PyErr_Occurred()) {
        out = dflt;
        Py_INCREF(out);
    }
    return out;
usage:
    PyErr_SetString(PyExc_TypeError, "get() takes a key and an optional default");
    return NULL;
}

static int handle_contains(Handle *self, PyObject *key)
{
    const char *k;
    Py_ssize_t klen;
    PyObject *tmp;
    int found = -1;
    if (bytes_of(key, "key", &k, &klen, &tmp))
        return -1;
    struct mmkv_view *v = self->view;
    int rc = NOT_TRIED;
    if (!v) {
        raise_dead(self);
        goto done;
    }
    if (!v->held) {
        /* capacity 0: nothing is copied; a present key gives ENOBUFS (or 0 for an empty value) */
        struct mmkv_getbuf g = {.buf = thread_buf, .cap = 0};
        rc = lookup(self, v, k, klen, &g);
        if (rc == 0 || rc == ENOBUFS || rc == ENOENT) {
            found = rc != ENOENT;
            if (rc == ENOENT && g.expired && reap(self, key))
                found = -1;
            goto done;
        }
    }
    PyObject *out = call_slow(self, s_contains_slow, rc, key, k, klen, NULL);
    if (out) {
        found = PyObject_IsTrue(out);
        Py_DECREF(out);
    }
done:
    Py_XDECREF(tmp);
    return found;
}

static Py_ssize_t handle_length(Handle *self)
{
    struct mmkv_view *v = self->view;
    if (!v) {
        raise_dead(self);
        return -1;
    }
    if (!v->held) {
        uint64_t n;
        /* a count no file of this size could hold is a damaged word: the general path recounts */
        if (core.count_nowait(v, &n) == 0 && n <= v->size / sizeof(struct mmkv_record) && n <= (uint64_t)PY_SSIZE_T_MAX)
            return (Py_ssize_t)n;
    }
    PyObject *out = PyObject_CallMethodNoArgs((PyObject *)self, s_len_slow);
    if (!out)
        return -1;
    Py_ssize_t n = PyLong_AsSsize_t(out);
    Py_DECREF(out);
    return n;
}

/* ------------------------------------------------------------------ writes */

static int check_writable(Handle *self)
{
    if (!self->readonly)
        return 0;
    PyObject *out = PyObject_CallMethodNoArgs((PyObject *)self, s_writable);
    Py_XDECREF(out);
    return -1; /* _writable raises on a read-only handle */
}

static int put_one(Handle *self, PyObject *key, PyObject *value)
{
    const char *k, *val;
    Py_ssize_t klen, vlen;
    PyObject *ktmp, *vtmp = NULL, *out;
    int ok = -1;
    if (bytes_of(key, "key", &k, &klen, &ktmp) || bytes_of(value, "value", &val, &vlen, &vtmp) ||
        check_writable(self) || check_sizes(klen, vlen))
        goto done;
    struct mmkv_view *v = self->view;
    int rc = NOT_TRIED;
    if (!v) {
        raise_dead(self);
        goto done;
    }
    if (!v->held) {
        FUSED(self, rc, core.put(v, (const uint8_t *)k, (uint64_t)klen, (const uint8_t *)val, (uint64_t)vlen, 0, take));
        if (rc == 0) {
            ok = 0;
            goto done;
        }
    }
    PyObject *vb = bytes_object(value, val, vlen);
    if (!vb)
        goto done;
    out = call_slow(self, s_put_slow, rc, key, k, klen, vb);
    Py_DECREF(vb);
    if (out) {
        Py_DECREF(out);
        ok = 0;
    }
done:
    Py_XDECREF(ktmp);
    Py_XDECREF(vtmp);
    return ok;
}

static int delete_one(Handle *self, PyObject *key)
{
    const char *k;
    Py_ssize_t klen;
    PyObject *tmp;
    int ok = -1;
    if (bytes_of(key, "key", &k, &klen, &tmp) || check_writable(self))
        goto done;
    struct mmkv_view *v = self->view;
    int rc = NOT_TRIED;
    if (!v) {
        raise_dead(self);
        goto done;
    }
    if (!v->held) {
        FUSED(self, rc, core.delete_(v, (const uint8_t *)k, (uint64_t)klen, take));
        if (rc == 0) {
            ok = 0;
            goto done;
        }
        if (rc == ENOENT) {
            PyErr_SetObject(PyExc_KeyError, key);
            goto done;
        }
    }
    PyObject *out = call_slow(self, s_delete_slow, rc, key, k, klen, NULL);
    if (out) {
        int deleted = PyObject_IsTrue(out);
        Py_DECREF(out);
        if (deleted > 0)
            ok = 0;
        else if (deleted == 0)
            PyErr_SetObject(PyExc_KeyError, key);
    }
done:
    Py_XDECREF(tmp);
    return ok;
}

static int handle_ass_subscript(Handle *self, PyObject *key, PyObject *value)
{
    return value ? put_one(self, key, value) : delete_one(self, key);
}

PyDoc_STRVAR(pop_doc,
"pop(key[, default]) -> remove key and return its value (or default), atomically under the lock.\n\n"
":raises KeyError: absent and no default.  :raises TypeError: key is not bytes or str.");

static PyObject *handle_pop(Handle *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "pop expected 1 or 2 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *key = args[0], *tmp, *out = NULL;
    const char *k;
    Py_ssize_t klen;
    if (bytes_of(key, "key", &k, &klen, &tmp) || check_writable(self))
        goto done;
    struct mmkv_view *v = self->view;
    int rc = NOT_TRIED;
    if (!v) {
        raise_dead(self);
        goto done;
    }
    if (!v->held) {
        PyObject *made = NULL;
        struct mmkv_getbuf g = DIRECT_GETBUF(&made);
        rc = core.take(v, (const uint8_t *)k, (uint64_t)klen, &g, MMKV_TRY_LOCK);
        if (rc == EBUSY) {                 /* wait without the GIL, into the thread's buffer */
            PyObject *owner = self->owner;
            Py_INCREF(owner);
            struct mmkv_getbuf w = {.buf = thread_buf, .cap = FAST_BUFFER};
            Py_BEGIN_ALLOW_THREADS
            rc = core.take(v, (const uint8_t *)k, (uint64_t)klen, &w, MMKV_TAKE_LOCK);
            Py_END_ALLOW_THREADS
            Py_DECREF(owner);
            g = w;
        }
        if (rc == 0) {
            out = value_from(&g, &made);
            goto done;
        }
        Py_CLEAR(made);
        if (PyErr_Occurred())       /* the value's object could not be made (ENOBUFS): nothing changed */
            goto done;
    }
    if (rc != ENOENT) {
        out = call_slow(self, s_pop_slow, rc, key, k, klen, NULL);
        if (out != Py_None)
            goto done;
        Py_DECREF(out);
        out = NULL;
    }
    if (nargs == 2) {
        out = args[1];
        Py_INCREF(out);
    } else {
        PyErr_SetObject(PyExc_KeyError, key);
    }
done:
    Py_XDECREF(tmp);
    return out;
}

PyDoc_STRVAR(get_many_doc,
"get_many(keys, default=None) -> a list of the values of keys, in their order (default for an\n"
"absent key), all as of one moment: no other process's write lands between two of them.\n\n"
"Lock-free while no writer is active (else under one hold of the lock, O(len(keys))).\n"
":raises TypeError: keys is not iterable, or one is not bytes or str.");

/* The values of a batch that returned 0: a list, default where found[i] is 0 (a new reference). */
static PyObject *many_result(const uint8_t *buf, const uint64_t *ends, const uint8_t *found, Py_ssize_t n,
                             PyObject *dflt)
{
    PyObject *out = PyList_New(n);
    uint64_t start = 0;
    for (Py_ssize_t i = 0; out && i < n; i++) {
        PyObject *item = dflt;
        if (found[i]) {
            item = PyBytes_FromStringAndSize((const char *)buf + start, (Py_ssize_t)(ends[i] - start));
            if (!item) {
                Py_CLEAR(out);
                break;
            }
        } else {
            Py_INCREF(item);
        }
        start = ends[i];
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

static PyObject *handle_get_many(Handle *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *keys_arg, *dflt;
    if (one_and_default(args, nargs, kwnames, "keys", &keys_arg, &dflt))
        goto usage;
    PyObject *seq = PySequence_Fast(keys_arg, "get_many() takes an iterable of keys");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    /* keys that are not exact bytes are converted once, into conv (in their order) */
    PyObject *out = NULL, *conv = NULL, *kb = NULL;
    const char **ptrs = PyMem_Malloc(sizeof(char *) * (size_t)(n + 1));
    uint64_t *key_ends = PyMem_Malloc(sizeof(uint64_t) * (size_t)(2 * n + 1));
    uint8_t *found = PyMem_Malloc((size_t)n + 1), *blob = NULL, *big = NULL;
    if (!ptrs || !key_ends || !found) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t *val_ends = key_ends + n, total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PySequence_Fast_GET_ITEM(seq, i), *tmp;
        const char *k;
        Py_ssize_t klen;
        if (bytes_of(key, "key", &k, &klen, &tmp))
            goto done;
        if (!PyBytes_CheckExact(key)) {
            PyObject *b = tmp ? tmp : bytes_object(key, k, klen);
            if (!b || (!conv && !(conv = PyList_New(0))) || PyList_Append(conv, b)) {
                Py_XDECREF(b);
                goto done;
            }
            Py_DECREF(b);              /* conv holds it */
            k = PyBytes_AS_STRING(b);
        }
        ptrs[i] = k;
        total += (uint64_t)klen;
        key_ends[i] = total;
    }
    blob = PyMem_Malloc((size_t)total + 1);
    if (!blob) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t k0 = i ? key_ends[i - 1] : 0;
        memcpy(blob + k0, ptrs[i], (size_t)(key_ends[i] - k0));
    }
    struct mmkv_view *v = self->view;
    int rc = NOT_TRIED;
    if (!v) {
        raise_dead(self);
        goto done;
    }
    if (!v->held) {
        struct mmkv_getbuf g = {.buf = thread_buf, .cap = FAST_BUFFER};
        for (int tries = 0; tries < SIZE_RETRIES; tries++) {
            /* without waiting, then (EBUSY) waiting for the lock without the GIL */
            FUSED(self, rc, core.get_many(v, blob, key_ends, (uint64_t)n, &g, val_ends, found, take == MMKV_TAKE_LOCK));
            if (rc != ENOBUFS)
                break;
            PyMem_Free(big);                         /* values larger than the buffer: one of their size */
            big = g.val_len < (uint64_t)PY_SSIZE_T_MAX ? PyMem_Malloc((size_t)g.val_len + 1) : NULL;
            if (!big) {
                PyErr_NoMemory();
                goto done;
            }
            g.buf = big;
            g.cap = g.val_len;
        }
        if (rc == 0) {
            out = many_result(g.buf, val_ends, found, n, dflt);
            goto done;
        }
    }
    kb = PyList_New(n);                   /* the keys as bytes, for the general path */
    for (Py_ssize_t i = 0, j = 0; kb && i < n; i++) {
        PyObject *key = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *b = PyBytes_CheckExact(key) ? key : PyList_GET_ITEM(conv, j++);
        Py_INCREF(b);
        PyList_SET_ITEM(kb, i, b);
    }
    PyObject *code = kb ? rc_object(rc) : NULL;
    if (code) {
        PyObject *call[4] = {(PyObject *)self, code, kb, dflt};
        out = PyObject_VectorcallMethod(s_get_many_slow, call, 4, NULL);
        Py_DECREF(code);
    }
done:
    PyMem_Free(big);
    PyMem_Free(blob);
    PyMem_Free(found);
    PyMem_Free(key_ends);
    PyMem_Free(ptrs);
    Py_XDECREF(conv);
    Py_XDECREF(kb);
    Py_DECREF(seq);
    return out;
usage:
    PyErr_SetString(PyExc_TypeError, "get_many() takes an iterable of keys and an optional default");
    return NULL;
}

PyDoc_STRVAR(cas_doc,
"cas(key, expected, new) -> True when key held expected (None: was absent) and now holds new\n"
"(None: is deleted); False, and nothing changed, when it held anything else.\n\n"
"Atomic across processes (under the store lock).  :raises TypeError: key, expected or new is not\n"
"bytes or str (or None).  :raises LimitError: new too large.  :raises DiskFullError: no room; unchanged.");

/* A value argument of cas: None (has = 0) or bytes_of's. */
static int optional_bytes(PyObject *obj, const char *what, const char **data, Py_ssize_t *len, PyObject **tmp,
                          int *has)
{
    *tmp = NULL;
    *has = obj != Py_None;
    if (!*has) {
        *data = "";
        *len = 0;
        return 0;
    }
    return bytes_of(obj, what, data, len, tmp);
}

static PyObject *handle_cas(Handle *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "cas() takes 3 arguments (key, expected, new), got %zd", nargs);
        return NULL;
    }
    PyObject *key = args[0], *ktmp = NULL, *etmp = NULL, *ntmp = NULL, *out = NULL;
    const char *k, *e, *n;
    Py_ssize_t klen, elen, nlen;
    int has_e, has_n;
    if (bytes_of(key, "key", &k, &klen, &ktmp) || optional_bytes(args[1], "value", &e, &elen, &etmp, &has_e) ||
        optional_bytes(args[2], "value", &n, &nlen, &ntmp, &has_n) || check_writable(self) ||
        check_sizes(klen, nlen))
        goto done;
    struct mmkv_view *v = self->view;
    int rc = NOT_TRIED;
    if (!v) {
        raise_dead(self);
        goto done;
    }
    if (!v->held) {
        FUSED(self, rc, core.cas(v, (const uint8_t *)k, (uint64_t)klen, (const uint8_t *)e, (uint64_t)elen, has_e,
                                 (const uint8_t *)n, (uint64_t)nlen, has_n, take));
        if (rc == 0 || rc == ECANCELED) {
            out = PyBool_FromLong(rc == 0);
            goto done;
        }
    }
    PyObject *eb = has_e ? bytes_object(args[1], e, elen) : Py_NewRef(Py_None);
    PyObject *nb = !eb ? NULL : has_n ? bytes_object(args[2], n, nlen) : Py_NewRef(Py_None);
    PyObject *pair = nb ? PyTuple_Pack(2, eb, nb) : NULL;
    Py_XDECREF(eb);
    Py_XDECREF(nb);
    if (pair) {
        out = call_slow(self, s_cas_slow, rc, key, k, klen, pair);
        Py_DECREF(pair);
    }
done:
    Py_XDECREF(ktmp);
    Py_XDECREF(etmp);
    Py_XDECREF(ntmp);
    return out;
}

PyDoc_STRVAR(incr_doc,
"incr(key, delta=1) -> add delta to the 8-byte signed counter at key; the new value.\n\n"
"Atomic across processes; a missing key counts from 0.  The value is stored as 8 little-endian\n"
"bytes.  :raises NotACounterError: the value is not 8 bytes.  :raises OverflowError: the result\n"
"leaves the signed 64-bit range.  :raises TypeError: delta is not an int.");

static PyObject *handle_incr(Handle *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *key = nargs >= 1 ? args[0] : NULL, *delta = nargs >= 2 ? args[1] : NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > 2)
        goto usage;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(name, "delta") == 0 && !delta)
            delta = args[nargs + i];
        else if (PyUnicode_CompareWithASCIIString(name, "key") == 0 && !key)
            key = args[nargs + i];
        else
            goto usage;
    }
    if (!key)
        goto usage;
    static PyObject *one;
    if (!delta) {
        if (!one && !(one = PyLong_FromLong(1)))
            return NULL;
        delta = one;
    }
    const char *k;
    Py_ssize_t klen;
    PyObject *tmp, *out = NULL;
    if (bytes_of(key, "key", &k, &klen, &tmp))
        return NULL;
    struct mmkv_view *v = self->view;
    int rc = NOT_TRIED;
    int overflow = 1;
    long long d = PyLong_CheckExact(delta) ? PyLong_AsLongLongAndOverflow(delta, &overflow) : 0;
    /* the general path says why for a bad delta, a long key or a read-only handle */
    if (v && !v->held && !overflow && !self->readonly && (uint64_t)klen <= max_key_size) {
        int64_t now;
        FUSED(self, rc, core.incr(v, (const uint8_t *)k, (uint64_t)klen, (int64_t)d, &now, take));
        if (rc == 0) {
            out = PyLong_FromLongLong(now);
            goto done;
        }
    }
    out = call_slow(self, s_incr_slow, rc, key, k, klen, delta);
done:
    Py_XDECREF(tmp);
    return out;
usage:
    PyErr_SetString(PyExc_TypeError, "incr() takes a key and an optional delta");
    return NULL;
}

/* ------------------------------------------------------------------ update's loop */

/* One pair of an update source, checked: its key and value bytes (tmp: copies to release). */
struct pair {
    PyObject *key, *value;
    const char *k, *val;
    Py_ssize_t klen, vlen;
    PyObject *ktmp, *vtmp;
};

static void pair_release(struct pair *p)
{
    Py_CLEAR(p->ktmp);
    Py_CLEAR(p->vtmp);
}

static int pair_of(struct pair *p, PyObject *key, PyObject *value)
{
    p->key = key;
    p->value = value;
    p->ktmp = p->vtmp = NULL;
    if (bytes_of(key, "key", &p->k, &p->klen, &p->ktmp) ||
        bytes_of(value, "value", &p->val, &p->vlen, &p->vtmp) || check_sizes(p->klen, p->vlen)) {
        pair_release(p);
        return -1;
    }
    return 0;
}

/* Element i of a sequence of pairs, as dict.update reads it: (key, value) borrowed from the
   2-item sequence *fast (a new reference the caller releases). */
static int unpack(PyObject *item, Py_ssize_t i, PyObject **fast, PyObject **key, PyObject **value)
{
    *fast = PySequence_Fast(item, "");
    if (!*fast) {
        if (PyErr_ExceptionMatches(PyExc_TypeError))
            PyErr_Format(PyExc_TypeError, "cannot convert dictionary update sequence element #%zd to a sequence", i);
        return -1;
    }
    if (PySequence_Fast_GET_SIZE(*fast) != 2) {
        PyErr_Format(PyExc_ValueError, "dictionary update sequence element #%zd has length %zd; 2 is required", i,
                     PySequence_Fast_GET_SIZE(*fast));
        Py_CLEAR(*fast);
        return -1;
    }
    *key = PySequence_Fast_GET_ITEM(*fast, 0);
    *value = PySequence_Fast_GET_ITEM(*fast, 1);
    return 0;
}

/* Store one checked pair; the caller holds the lock.  On ENOSPC or EAGAIN the general path
   grows the file or splits the segment (_make_room) and the put is tried again. */
static int put_locked(Handle *self, struct pair *p)
{
    PyObject *kb = NULL, *vb = NULL, *grew_for = Py_None;
    Py_INCREF(grew_for);
    int ok = -1;
    for (;;) {
        struct mmkv_view *v = self->view;
        if (!v) {
            raise_dead(self);
            break;
        }
        int rc = core.put(v, (const uint8_t *)p->k, (uint64_t)p->klen, (const uint8_t *)p->val, (uint64_t)p->vlen,
                          0, 0);
        if (rc == 0) {
            ok = 0;
            break;
        }
        if (!kb && !(kb = bytes_object(p->key, p->k, p->klen)))
            break;
        if (!vb && !(vb = bytes_object(p->value, p->val, p->vlen)))
            break;
        PyObject *code = PyLong_FromLong(rc);
        if (!code)
            break;
        PyObject *cargs[5] = {(PyObject *)self, code, kb, vb, grew_for};
        PyObject *grew = PyObject_VectorcallMethod(s_make_room, cargs, 5, NULL);
        Py_DECREF(code);
        if (!grew)
            break;
        Py_SETREF(grew_for, grew);
    }
    Py_XDECREF(kb);
    Py_XDECREF(vb);
    Py_DECREF(grew_for);
    return ok;
}

/* Pairs a pass over an update's source looks ahead: it prefetches their objects, whose first
   touch (a cache miss each for a big source) is most of the pass's cost. */
#define LOOKAHEAD 8

/* Advance a second walk of the dict LOOKAHEAD pairs ahead of the first and prefetch its pair. */
static void prefetch_dict(PyObject *dict, Py_ssize_t *ahead)
{
    PyObject *key, *value;
    if (PyDict_Next(dict, ahead, &key, &value)) {
        __builtin_prefetch(key);
        __builtin_prefetch(value);
    }
}

/* Tell the general path what follows, so it can make room in one step (self._reserve_for). */
static int reserve_for(Handle *self, Py_ssize_t n, uint64_t nbytes)
{
    PyObject *out = PyObject_CallMethod((PyObject *)self, "_reserve_for", "nK", n, (unsigned long long)nbytes);
    Py_XDECREF(out);
    return out ? 0 : -1;
}

/* Bytes of the record of one pair (its block's header and rounding are the general path's). */
static uint64_t record_bytes(const struct pair *p)
{
    return sizeof(struct mmkv_record) + (((uint64_t)p->klen + 7) & ~(uint64_t)7) + (uint64_t)p->vlen;
}

PyDoc_STRVAR(put_pairs_doc,
"_put_pairs(source): store every pair of source (a dict, an object with items(), or an iterable\n"
"of pairs) in order.  The caller holds the store lock (update() does).  Every key and value is\n"
"checked first: a TypeError, ValueError or LimitError is raised before anything is written; then\n"
"self._reserve_for(pairs, record bytes) may make room in one step.");

static PyObject *handle_put_pairs(Handle *self, PyObject *source)
{
    struct pair p;
    if (PyDict_CheckExact(source)) {
        PyObject *key, *value;
        Py_ssize_t pos = 0, ahead = 0;
        uint64_t nbytes = 0;
        for (int i = 0; i < LOOKAHEAD; i++)
            prefetch_dict(source, &ahead);
        while (PyDict_Next(source, &pos, &key, &value)) { /* check everything first */
            prefetch_dict(source, &ahead);
            if (pair_of(&p, key, value))
                return NULL;
            nbytes += record_bytes(&p);
            pair_release(&p);
        }
        if (reserve_for(self, PyDict_GET_SIZE(source), nbytes))
            return NULL;
        pos = ahead = 0;
        for (int i = 0; i < LOOKAHEAD; i++)
            prefetch_dict(source, &ahead);
        Py_ssize_t size = PyDict_GET_SIZE(source);
        while (PyDict_Next(source, &pos, &key, &value)) {
            prefetch_dict(source, &ahead);
            Py_INCREF(key);
            Py_INCREF(value);
            int rc = pair_of(&p, key, value);
            if (!rc) {
                rc = put_locked(self, &p);
                pair_release(&p);
            }
            Py_DECREF(key);
            Py_DECREF(value);
            if (rc)
                return NULL;
            if (PyDict_GET_SIZE(source) != size) {
                PyErr_SetString(PyExc_RuntimeError, "dictionary changed size during update()");
                return NULL;
            }
        }
        Py_RETURN_NONE;
    }
    /* anything else is read once into a list of pairs, so it can be checked before writing */
    PyObject *list, *items = PyObject_GetAttr(source, s_items);
    if (!items) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return NULL;
        PyErr_Clear();
    }
    if (items) {
        PyObject *view = PyObject_CallNoArgs(items);
        Py_DECREF(items);
        if (!view)
            return NULL;
        list = PySequence_List(view);
        Py_DECREF(view);
    } else {
        list = PySequence_List(source);
    }
    if (!list)
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = PyList_GET_SIZE(list);
    uint64_t nbytes = 0;
    for (int writing = 0; writing < 2; writing++) {
        if (writing && reserve_for(self, n, nbytes))
            goto out;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *fast, *key, *value;
            if (i + 2 * LOOKAHEAD < n)
                __builtin_prefetch(PyList_GET_ITEM(list, i + 2 * LOOKAHEAD));
            if (i + LOOKAHEAD < n && PyTuple_CheckExact(PyList_GET_ITEM(list, i + LOOKAHEAD)) &&
                PyTuple_GET_SIZE(PyList_GET_ITEM(list, i + LOOKAHEAD)) == 2) {
                __builtin_prefetch(PyTuple_GET_ITEM(PyList_GET_ITEM(list, i + LOOKAHEAD), 0));
                __builtin_prefetch(PyTuple_GET_ITEM(PyList_GET_ITEM(list, i + LOOKAHEAD), 1));
            }
            if (unpack(PyList_GET_ITEM(list, i), i, &fast, &key, &value))
                goto out;
            int rc = pair_of(&p, key, value);
            if (!rc && !writing)
                nbytes += record_bytes(&p);
            if (!rc && writing)
                rc = put_locked(self, &p);
            if (!rc)
                pair_release(&p);
            Py_DECREF(fast);
            if (rc)
                goto out;
        }
    }
    result = Py_None;
    Py_INCREF(result);
out:
    Py_DECREF(list);
    return result;
}

/* ------------------------------------------------------------------ binding a view */

PyDoc_STRVAR(bind_doc,
"_bind(owner, view, readonly): serve calls from the struct mmkv_view at address view (an int),\n"
"owned by the cffi object owner (kept alive while bound).  Called by the Store when it attaches.");

static PyObject *handle_bind(Handle *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "_bind() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!core.get) {
        PyErr_SetString(PyExc_RuntimeError, "mmkv._fast: init() was not called");
        return NULL;
    }
    void *view = PyLong_AsVoidPtr(args[1]);
    if (!view) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "mmkv._fast: the view address is NULL");
        return NULL;
    }
    int readonly = PyObject_IsTrue(args[2]);
    if (readonly < 0)
        return NULL;
    Py_INCREF(args[0]);
    Py_XSETREF(self->owner, args[0]);
    self->view = view;
    self->readonly = readonly;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(unbind_doc,
"_unbind(): stop serving calls (each raises what _dead() returns) and drop the view's owner.\n"
"Called when the handle closes and in a forked child.");

static PyObject *handle_unbind(Handle *self, PyObject *unused)
{
    (void)unused;
    self->view = NULL;
    Py_CLEAR(self->owner);
    Py_RETURN_NONE;
}

static void handle_dealloc(Handle *self)
{
    self->view = NULL;
    Py_CLEAR(self->owner);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef handle_methods[] = {
    {"get", (PyCFunction)(void (*)(void))handle_get, METH_FASTCALL | METH_KEYWORDS, get_doc},
    {"pop", (PyCFunction)(void (*)(void))handle_pop, METH_FASTCALL, pop_doc},
    {"incr", (PyCFunction)(void (*)(void))handle_incr, METH_FASTCALL | METH_KEYWORDS, incr_doc},
    {"cas", (PyCFunction)(void (*)(void))handle_cas, METH_FASTCALL, cas_doc},
    {"get_many", (PyCFunction)(void (*)(void))handle_get_many, METH_FASTCALL | METH_KEYWORDS, get_many_doc},
    {"_put_pairs", (PyCFunction)handle_put_pairs, METH_O, put_pairs_doc},
    {"_bind", (PyCFunction)(void (*)(void))handle_bind, METH_FASTCALL, bind_doc},
    {"_unbind", (PyCFunction)handle_unbind, METH_NOARGS, unbind_doc},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods handle_as_mapping = {
    .mp_length = (lenfunc)handle_length,
    .mp_subscript = (binaryfunc)handle_subscript,
    .mp_ass_subscript = (objobjargproc)handle_ass_subscript,
};

static PySequenceMethods handle_as_sequence = {
    .sq_contains = (objobjproc)handle_contains,
};

PyDoc_STRVAR(handle_doc,
"The per-call operations of one open mmkv handle, in C: the base class of mmkv.Store when the\n"
"CPython binding is in use.  See mmkv.Store for what each call does.");

static PyTypeObject HandleType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mmkv._fast.Handle",
    .tp_basicsize = sizeof(Handle),
    .tp_dealloc = (destructor)handle_dealloc,
    .tp_as_sequence = &handle_as_sequence,
    .tp_as_mapping = &handle_as_mapping,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = handle_doc,
    .tp_methods = handle_methods,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------ module */

PyDoc_STRVAR(init_doc,
"init(addresses, limit_error, max_key_size, max_value_size): the addresses (ints) of the C core's\n"
"functions named in CORE_FUNCTIONS, in that order, taken from the cffi module, which holds the\n"
"one copy of the core; the exception class and limits for keys and values too large.");

static PyObject *fast_init(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "init() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "init: addresses must be a sequence");
    if (!seq)
        return NULL;
    void *p[N_CORE];
    int ok = PySequence_Fast_GET_SIZE(seq) == (Py_ssize_t)N_CORE;
    if (!ok)
        PyErr_Format(PyExc_ValueError, "init: %zu addresses are needed", N_CORE);
    for (size_t i = 0; ok && i < N_CORE; i++) {
        p[i] = PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(seq, (Py_ssize_t)i));
        if (!p[i]) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "init: a NULL address for %s", core_names[i]);
            ok = 0;
        }
    }
    Py_DECREF(seq);
    unsigned long long mk = ok ? PyLong_AsUnsignedLongLong(args[2]) : 0, mv = ok ? PyLong_AsUnsignedLongLong(args[3]) : 0;
    if (!ok || PyErr_Occurred())
        return NULL;
    if (!PyType_Check(args[1]) || !PyType_IsSubtype((PyTypeObject *)args[1], (PyTypeObject *)PyExc_Exception)) {
        PyErr_SetString(PyExc_TypeError, "init: limit_error must be an exception class");
        return NULL;
    }
    Py_INCREF(args[1]);
    Py_XSETREF(limit_error, args[1]);
    max_key_size = mk;
    max_value_size = mv;
    core.get = (get_fn *)p[0];
    core.get_nowait = (get_fn *)p[1];
    core.put = (put_fn *)p[2];
    core.delete_ = (delete_fn *)p[3];
    core.take = (take_fn *)p[4];
    core.incr = (incr_fn *)p[5];
    core.count_nowait = (count_fn *)p[6];
    core.cas = (cas_fn *)p[7];
    core.get_many = (many_fn *)p[8];
    _Static_assert(N_CORE == 9, "every name in core_names is assigned above, in its order");
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ iteration batches */

PyDoc_STRVAR(scan_batch_doc,
"_scan_batch(entries, n, base, size, mode, budget) -> (items, used)\n\n"
"Build one batch of iteration from n entries (hash, record offset, key length | bytes before the\n"
"value << 32, value length) that\n"
"mmkv_scan wrote at address entries, reading keys and values from the mapping at address base\n"
"(size bytes): mode 0 keys, 1 values, 2 (key, value) pairs.  Stops, between two hashes, once the\n"
"bytes taken reach budget.  used: the entries taken.  The caller holds the store lock (the\n"
"entries are only valid under it); every range is checked against size.");

static PyObject *fast_scan_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "_scan_batch() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    const uint64_t *e = PyLong_AsVoidPtr(args[0]);
    unsigned long long n = PyLong_AsUnsignedLongLong(args[1]);
    const uint8_t *base = PyLong_AsVoidPtr(args[2]);
    unsigned long long size = PyLong_AsUnsignedLongLong(args[3]);
    long mode = PyLong_AsLong(args[4]);
    unsigned long long budget = PyLong_AsUnsignedLongLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (!e || !base || mode < 0 || mode > 2 || n > ((unsigned long long)1 << 32)) {
        PyErr_SetString(PyExc_ValueError, "_scan_batch: bad arguments");
        return NULL;
    }
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    unsigned long long used = 0, taken = 0;
    for (; used < n; used++) {
        uint64_t h = e[4 * used], rec = e[4 * used + 1], klen = e[4 * used + 2] & 0xffffffff, vlen = e[4 * used + 3];
        uint64_t skip = e[4 * used + 2] >> 32;   /* a deadline's bytes before the value (mmkv_scan) */
        if (used + 8 < n && e[4 * (used + 8) + 1] < size) {   /* the records lie anywhere: overlap the misses */
            const uint8_t *ahead = base + e[4 * (used + 8) + 1];
            __builtin_prefetch(ahead);
            __builtin_prefetch(ahead + 64);
        }
        if (used && taken >= budget && h != e[4 * (used - 1)])
            break;
        uint64_t k0 = rec + sizeof(struct mmkv_record), v0 = k0 + ((klen + 7) & ~(uint64_t)7) + skip;
        if (rec > size || k0 > size || klen > size - k0 || skip > 8 || v0 > size || vlen > size - v0) {
            Py_DECREF(list);
            PyErr_SetString(PyExc_ValueError, "_scan_batch: an entry lies outside the mapping");
            return NULL;
        }
        PyObject *key = NULL, *value = NULL, *item;
        if (mode != 1 && !(key = PyBytes_FromStringAndSize((const char *)base + k0, (Py_ssize_t)klen)))
            goto fail;
        if (mode != 0 && !(value = PyBytes_FromStringAndSize((const char *)base + v0, (Py_ssize_t)vlen)))
            goto fail;
        if (mode == 2) {
            item = PyTuple_New(2);
            if (!item)
                goto fail;
            PyTuple_SET_ITEM(item, 0, key);
            PyTuple_SET_ITEM(item, 1, value);
            PyObject_GC_UnTrack(item);      /* two bytes objects: no cycle; a batch of tracked
                                               tuples makes every young collection walk them */
        } else {
            item = mode ? value : key;
        }
        if (PyList_Append(list, item) < 0) {
            Py_DECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
        taken += klen * (mode != 1) + vlen * (mode != 0);
        continue;
    fail:
        Py_XDECREF(key);
        Py_XDECREF(value);
        Py_DECREF(list);
        return NULL;
    }
    return Py_BuildValue("(NK)", list, used);
}

static PyMethodDef fast_methods[] = {
    {"init", (PyCFunction)(void (*)(void))fast_init, METH_FASTCALL, init_doc},
    {"_scan_batch", (PyCFunction)(void (*)(void))fast_scan_batch, METH_FASTCALL, scan_batch_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fast_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mmkv._fast",
    .m_doc = "CPython binding of mmkv's per-call operations; calls the C core of mmkv._native.",
    .m_size = -1,
    .m_methods = fast_methods,
};

static int intern_names(void)
{
    struct { PyObject **slot; const char *name; } names[] = {
        {&s_dead, "_dead"}, {&s_read_slow, "_read_slow"}, {&s_contains_slow, "_contains_slow"},
        {&s_put_slow, "_put_slow"}, {&s_delete_slow, "_delete_slow"}, {&s_pop_slow, "_pop_slow"},
        {&s_incr_slow, "_incr_slow"}, {&s_len_slow, "_len_slow"}, {&s_make_room, "_make_room"},
        {&s_reserve_for, "_reserve_for"},
        {&s_writable, "_writable"}, {&s_items, "items"}, {&s_cas_slow, "_cas_slow"},
        {&s_get_many_slow, "_get_many_slow"}, {&s_reap, "_reap"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (!(*names[i].slot = PyUnicode_InternFromString(names[i].name)))
            return -1;
    return 0;
}

PyMODINIT_FUNC PyInit__fast(void)
{
    if (intern_names() || PyType_Ready(&HandleType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fast_module);
    if (!m)
        return NULL;
    PyObject *names = PyTuple_New((Py_ssize_t)N_CORE);
    if (!names)
        goto fail;
    for (size_t i = 0; i < N_CORE; i++) {
        PyObject *s = PyUnicode_FromString(core_names[i]);
        if (!s) {
            Py_DECREF(names);
            goto fail;
        }
        PyTuple_SET_ITEM(names, (Py_ssize_t)i, s);
    }
    if (PyModule_AddObject(m, "CORE_FUNCTIONS", names) < 0) {
        Py_DECREF(names);
        goto fail;
    }
    if (PyModule_AddObjectRef(m, "Handle", (PyObject *)&HandleType) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
