/*
 * A numpy memory handler (NEP 49) that places a worker's large arrays in the object store.
 *
 * numpy asks the handler of the current context for every array's data. This one sends
 * allocations of at least `threshold` bytes to a Python callback, which carves a block out
 * of the shared-memory store (or declines: 0); everything else, and whatever is declined,
 * goes to the C library as numpy's default handler would. A task whose result is such an
 * array then reaches the store by sealing its block: no copy (sharedcompute/_worker/_arena.py).
 *
 * The callbacks run with the GIL held (taken if need be) and the error indicator saved, so
 * an allocation in the middle of an exception, or a free from a finalizer, is safe; a
 * callback that raises counts as a decline (its error is reported as unraisable). While
 * one runs, further large allocations of this thread go to the C library (no re-entry).
 *
 * No numpy headers: the handler's layout is fixed by NEP 49 (version 1), and
 * PyDataMem_SetHandler is taken from numpy's C-API table, whose slots never move.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
} DataMemAllocator;

typedef struct {
    char name[127];
    uint8_t version;
    DataMemAllocator allocator;
} DataMemHandler;

#define SET_HANDLER_SLOT 304 /* PyDataMem_SetHandler in numpy's C-API table (numpy >= 1.22) */

static size_t threshold = SIZE_MAX;
static uintptr_t arena_lo = 0, arena_hi = 0;
static PyObject *on_alloc = NULL; /* (size) -> address, or 0 to decline */
static PyObject *on_free = NULL;  /* (address) -> None */
static PyObject *on_size = NULL;  /* (address) -> the block's size */
static _Thread_local int busy = 0; /* a callback of this handler runs in this thread */

static int in_arena(const void *ptr) {
    uintptr_t address = (uintptr_t)ptr;
    return address >= arena_lo && address < arena_hi;
}

/* Call `callback(argument)` and return what it returns as an address or size (0: none). */
static size_t call(PyObject *callback, size_t argument) {
    size_t value = 0;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *type, *error, *traceback;
    PyErr_Fetch(&type, &error, &traceback);
    busy = 1;
    PyObject *result = PyObject_CallFunction(callback, "n", (Py_ssize_t)argument);
    busy = 0;
    if (result == NULL) {
        PyErr_WriteUnraisable(callback);
    } else {
        if (result != Py_None) {
            value = PyLong_AsSize_t(result);
            if (value == (size_t)-1 && PyErr_Occurred()) {
                PyErr_WriteUnraisable(callback);
                value = 0;
            }
        }
        Py_DECREF(result);
    }
    PyErr_Restore(type, error, traceback);
    PyGILState_Release(gil);
    return value;
}

static void *from_arena(size_t size) {
    PyObject *callback = on_alloc;
    if (callback == NULL || busy || size < threshold) {
        return NULL;
    }
    void *ptr = (void *)call(callback, size);
    if (ptr != NULL && !in_arena(ptr)) {
        return NULL; /* never: the callback hands out arena addresses only */
    }
    return ptr;
}

static void *handler_malloc(void *ctx, size_t size) {
    (void)ctx;
    void *ptr = from_arena(size);
    return ptr != NULL ? ptr : malloc(size);
}

static void *handler_calloc(void *ctx, size_t nelem, size_t elsize) {
    (void)ctx;
    if (elsize != 0 && nelem > SIZE_MAX / elsize) {
        return NULL;
    }
    size_t size = nelem * elsize;
    void *ptr = from_arena(size);
    if (ptr == NULL) {
        return calloc(nelem, elsize);
    }
    memset(ptr, 0, size); /* a reused block holds an earlier object's bytes */
    return ptr;
}

static void handler_free(void *ctx, void *ptr, size_t size) {
    (void)ctx;
    (void)size;
    if (ptr != NULL && in_arena(ptr)) {
        PyObject *callback = on_free;
        if (callback != NULL) {
            call(callback, (size_t)(uintptr_t)ptr);
        }
        return;
    }
    free(ptr);
}

static void *handler_realloc(void *ctx, void *ptr, size_t new_size) {
    if (ptr == NULL || !in_arena(ptr)) {
        return realloc(ptr, new_size);
    }
    size_t old_size = on_size != NULL ? call(on_size, (size_t)(uintptr_t)ptr) : 0;
    if (old_size == 0) {
        return NULL; /* its size is unknown: fail (numpy raises MemoryError), lose nothing */
    }
    void *moved = handler_malloc(ctx, new_size);
    if (moved == NULL) {
        return NULL; /* the old block stays, as realloc promises */
    }
    memcpy(moved, ptr, old_size < new_size ? old_size : new_size);
    handler_free(ctx, ptr, old_size);
    return moved;
}

static DataMemHandler handler = {
    "sharedcompute_arena",
    1,
    {NULL, handler_malloc, handler_calloc, handler_realloc, handler_free},
};

static PyObject *install(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *api, *alloc, *release, *size_of;
    unsigned long long lo, length, minimum;
    if (!PyArg_ParseTuple(args, "OKKKOOO", &api, &lo, &length, &minimum, &alloc, &release,
                          &size_of)) {
        return NULL;
    }
    if (!PyCallable_Check(alloc) || !PyCallable_Check(release) || !PyCallable_Check(size_of)) {
        PyErr_SetString(PyExc_TypeError, "install() needs three callables");
        return NULL;
    }
    void **table = (void **)PyCapsule_GetPointer(api, NULL);
    if (table == NULL) {
        return NULL;
    }
    PyObject *(*set_handler)(PyObject *) = (PyObject * (*)(PyObject *)) table[SET_HANDLER_SLOT];
    PyObject *capsule = PyCapsule_New(&handler, "mem_handler", NULL);
    if (capsule == NULL) {
        return NULL;
    }
    Py_INCREF(alloc);
    Py_INCREF(release);
    Py_INCREF(size_of);
    Py_XSETREF(on_alloc, alloc);
    Py_XSETREF(on_free, release);
    Py_XSETREF(on_size, size_of);
    arena_lo = (uintptr_t)lo;
    arena_hi = (uintptr_t)(lo + length);
    threshold = (size_t)minimum;
    PyObject *previous = set_handler(capsule);
    Py_DECREF(capsule);
    return previous; /* numpy's handler before (a new reference), or NULL with its error */
}

static PyObject *set_threshold(PyObject *self, PyObject *arg) {
    (void)self;
    size_t value = PyLong_AsSize_t(arg);
    if (value == (size_t)-1 && PyErr_Occurred()) {
        return NULL;
    }
    threshold = value;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"install", install, METH_VARARGS,
     "install(api, address, length, threshold, alloc, free, size_of): make this handler "
     "numpy's in the current context; return the previous one."},
    {"set_threshold", set_threshold, METH_O,
     "Arrays of at least this many bytes go to alloc(); a huge value turns it off."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_arena_handler", NULL, -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__arena_handler(void) { return PyModule_Create(&module); }
