/* Bernoulli whole-message loss decisions in C, one step at a time.
 *
 * lost_links(phase_key, call, links, salt, p, patterns, step) answers what
 * Bernoulli.message_decider's function answers for `step` (hvd_unreliable/faults/loss.py): the
 * draw of link i is the hash that hvd_unreliable/faults/keys.py computes with NumPy,
 *
 *     base = mix((mix(phase_key ^ step) + GAMMA) ^ call) + GAMMA
 *     u_i  = (mix(mix(base ^ links[i]) + salt) >> 11) * 2^-53,    lost_i = u_i < p,
 *
 * in the same wrapping 64-bit arithmetic and the same double operations, so the answers are
 * equal bit for bit (tests/test_faults.py compares them). `links` holds the links' codes as
 * native uint64 (at most 64 links: link i is bit i of the step's mask); `patterns` maps a mask
 * to its tuple of bools, made once per mask and shared by every step that loses those links
 * (a new tuple per step would feed Python's garbage collector). The loss model binds the first
 * six arguments with functools.partial, so a call costs one C call and no Python frame.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define GAMMA 0x9E3779B97F4A7C15ULL
#define MAX_PATTERNS 4096 /* as the NumPy path: a model of many links that loses at random */

static inline uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static PyObject *lost_links(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 || !PyBytes_Check(args[2]) || !PyDict_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError, "lost_links(phase_key, call, links: bytes, salt, p, patterns: dict, step)");
        return NULL;
    }
    Py_ssize_t nbytes = PyBytes_GET_SIZE(args[2]), n = nbytes / 8;
    if (n * 8 != nbytes || n > 64) {
        PyErr_SetString(PyExc_ValueError, "links: up to 64 uint64 link codes");
        return NULL;
    }
    uint64_t phase_key = PyLong_AsUnsignedLongLongMask(args[0]), call = PyLong_AsUnsignedLongLongMask(args[1]);
    uint64_t salt = PyLong_AsUnsignedLongLongMask(args[3]), step = PyLong_AsUnsignedLongLongMask(args[6]);
    double p = PyFloat_AsDouble(args[4]);
    if (PyErr_Occurred())
        return NULL;
    const char *links = PyBytes_AS_STRING(args[2]);
    uint64_t base = mix((mix(phase_key ^ step) + GAMMA) ^ call) + GAMMA, mask = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t link;
        memcpy(&link, links + 8 * i, 8);
        uint64_t z = mix(mix(base ^ link) + salt);
        if ((double)(z >> 11) * (1.0 / 9007199254740992.0) < p)
            mask |= 1ULL << i;
    }
    PyObject *key = PyLong_FromUnsignedLongLong(mask);
    if (!key)
        return NULL;
    PyObject *pattern = PyDict_GetItemWithError(args[5], key); /* borrowed */
    if (pattern) {
        Py_DECREF(key);
        Py_INCREF(pattern);
        return pattern;
    }
    if (PyErr_Occurred() || !(pattern = PyTuple_New(n))) {
        Py_DECREF(key);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *lost = (mask >> i & 1) ? Py_True : Py_False;
        Py_INCREF(lost);
        PyTuple_SET_ITEM(pattern, i, lost);
    }
    if (PyDict_GET_SIZE(args[5]) >= MAX_PATTERNS)
        PyDict_Clear(args[5]);
    int err = PyDict_SetItem(args[5], key, pattern);
    Py_DECREF(key);
    if (err) {
        Py_DECREF(pattern);
        return NULL;
    }
    return pattern;
}

static PyMethodDef methods[] = {
    {"lost_links", (PyCFunction)(void (*)(void))lost_links, METH_FASTCALL,
     "lost_links(phase_key, call, links, salt, p, patterns, step) -> the step's tuple of lost flags, one per link"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decide", NULL, -1, methods};

PyMODINIT_FUNC PyInit__decide(void) { return PyModule_Create(&module); }
