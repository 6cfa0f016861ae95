/* The exchange's hot path in C: copy the own block, restart persistent requests, poll them.
 *
 * One call does what the transport's Python does around MPI in every exchange on buffers it
 * has seen (hvd_unreliable/transport/native.py): the own block's memcpy, MPI_Startall and an
 * MPI_Testall loop that yields the core every 16 polls, for at most `spin` seconds. It returns
 * 1 when every request completed, 0 when some are still pending after `spin` (the Python wait
 * takes over: its deadline, its checks, its error naming the peers) and -code on an MPI error.
 * The GIL is released meanwhile. An optional `lost` (bytes, one per request) leaves the requests
 * of lost messages idle: a round that loses some links starts the others from the same handles
 * as a round that loses none, with no handle array made per loss pattern.
 *
 * It includes no MPI header and links no MPI library: bind() hands it MPI_Startall and
 * MPI_Testall as found in the libmpi that mpi4py loaded, and the sizes of that MPI's request
 * handle and status, so one build serves every MPI. Handles and statuses live in bytearrays that the
 * caller allocates and keeps (MPI_Status is opaque here: only its size matters).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <sched.h>
#include <string.h>
#include <time.h>

/* The own block is copied in pieces of this size. With one memcpy of many MiB the exchange took
 * 1.06-1.19x the time of MPI's Alltoall from 4 MiB per peer on the development machine; in pieces
 * it takes 0.81-0.95x its former time at 16 and 64 MiB, within 1.05x of Alltoall
 * (bench/bench_transport.py --against; docs/benchmarks.md). */
#define COPY_CHUNK ((Py_ssize_t)256 << 10)

typedef int (*startall_fn)(int, void *);
typedef int (*testall_fn)(int, void *, int *, void *);

static startall_fn startall;
static testall_fn testall;
static Py_ssize_t request_size, status_size;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static PyObject *bind(PyObject *self, PyObject *args)
{
    PyObject *start_obj, *test_obj;
    Py_ssize_t size, status;
    if (!PyArg_ParseTuple(args, "OOnn:bind", &start_obj, &test_obj, &size, &status))
        return NULL;
    void *start = PyLong_AsVoidPtr(start_obj), *test = PyLong_AsVoidPtr(test_obj);
    if (PyErr_Occurred())
        return NULL;
    if (!start || !test || size <= 0 || status <= 0) {
        PyErr_SetString(PyExc_ValueError, "bind(MPI_Startall address, MPI_Testall address, request size > 0, status size > 0)");
        return NULL;
    }
    startall = (startall_fn)start;
    testall = (testall_fn)test;
    request_size = size;
    status_size = status;
    Py_RETURN_NONE;
}

/* start_and_wait(handles, statuses, own_dst, own_src, own_bytes, spin[, lost]) -> 1, 0 or -MPI error code */
static PyObject *start_and_wait(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 && nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "start_and_wait(handles, statuses, own_dst, own_src, own_bytes, spin[, lost])");
        return NULL;
    }
    if (!startall) {
        PyErr_SetString(PyExc_RuntimeError, "start_and_wait before bind()");
        return NULL;
    }
    if (!PyByteArray_Check(args[0]) || !PyByteArray_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "handles and statuses must be bytearrays");
        return NULL;
    }
    Py_ssize_t n = PyByteArray_GET_SIZE(args[0]) / request_size;
    if (n * request_size != PyByteArray_GET_SIZE(args[0]) || PyByteArray_GET_SIZE(args[1]) < n * status_size || n > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "handles: whole request handles; statuses: room for one status each");
        return NULL;
    }
    const char *lost = NULL;
    if (nargs == 7 && args[6] != Py_None) {
        if (!PyBytes_Check(args[6]) || PyBytes_GET_SIZE(args[6]) != n) {
            PyErr_SetString(PyExc_ValueError, "lost: bytes, one per request handle");
            return NULL;
        }
        lost = PyBytes_AS_STRING(args[6]);
    }
    char *reqs = PyByteArray_AS_STRING(args[0]), *statuses = PyByteArray_AS_STRING(args[1]);
    char *dst = PyLong_AsVoidPtr(args[2]);
    const char *src = PyLong_AsVoidPtr(args[3]);
    Py_ssize_t nbytes = PyLong_AsSsize_t(args[4]);
    double spin = PyFloat_AsDouble(args[5]);
    if (PyErr_Occurred())
        return NULL;
    char *kept = NULL;
    if (lost) { /* the handles of the messages that go, side by side (a handle is a value: a copy starts the request) */
        kept = PyMem_Malloc(n ? (size_t)(n * request_size) : 1);
        if (!kept)
            return PyErr_NoMemory();
        Py_ssize_t k = 0;
        for (Py_ssize_t i = 0; i < n; i++)
            if (!lost[i])
                memcpy(kept + request_size * k++, reqs + request_size * i, (size_t)request_size);
        reqs = kept;
        n = k;
    }
    int err, done = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t done_bytes = 0; done_bytes < nbytes; done_bytes += COPY_CHUNK) /* (see COPY_CHUNK) */
        memcpy(dst + done_bytes, src + done_bytes, (size_t)(nbytes - done_bytes < COPY_CHUNK ? nbytes - done_bytes : COPY_CHUNK));
    err = startall((int)n, reqs);
    if (!err)
        err = testall((int)n, reqs, &done, statuses);
    if (!err && !done) {
        double start = now();
        for (unsigned polls = 1;; polls++) {
            err = testall((int)n, reqs, &done, statuses);
            if (err || done)
                break;
            if (!(polls & 15))
                sched_yield();
            if (!(polls & 255) && now() - start > spin)
                break;
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(kept);
    return PyLong_FromLong(err ? -(long)err : (long)done);
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS, "bind(MPI_Startall address, MPI_Testall address, sizeof(MPI_Request), sizeof(MPI_Status))"},
    {"start_and_wait", (PyCFunction)(void (*)(void))start_and_wait, METH_FASTCALL,
     "start_and_wait(handles, statuses, own_dst, own_src, own_bytes, spin[, lost]) -> 1 done, 0 pending, -MPI error"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
