/*
 * cdc_sync.protocol._speedups: the hot path of `_decode.decode_row` in C (optional).
 *
 * Contract: read_row(buf: bytes, streamed: bool, toast: object) returns exactly what
 * `_decode._read_row_py` returns for a well-formed Insert, Update or Delete message --
 * (xid or None, tag, relation oid, old-tuple marker, old tuple or None, new tuple or None) --
 * with `toast` standing for an unchanged TOAST value ('u'). For anything else (an unknown tag
 * or kind byte, a short read, a negative count or length, invalid UTF-8, trailing bytes) it
 * returns None and sets no exception: the caller then decodes the message in Python, which
 * raises the ProtocolError with its message and offset. So the error texts live in one place
 * (Python), and this file only has to agree with it on valid input; tests compare the two on
 * captured, generated and corrupted messages.
 *
 * Built by the hatch build hook (`hatch_build.py`) when a C compiler is available; without it
 * cdc-sync runs the pure-Python decoder, which is the reference. Only the CPython C API is
 * used (the protocol package depends on nothing outside the standard library).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static uint32_t
read_u32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

/* One TupleData from *pos; a new tuple, or NULL (with no exception set) when malformed.
 * Real errors (out of memory) also return NULL but leave their exception set. */
static PyObject *
read_tuple(const unsigned char *buf, Py_ssize_t end, Py_ssize_t *pos, PyObject *toast)
{
    Py_ssize_t p = *pos;
    if (p + 2 > end)
        return NULL;
    int ncols = (int16_t)(((unsigned)buf[p] << 8) | buf[p + 1]);
    if (ncols < 0)
        return NULL;
    p += 2;
    PyObject *values = PyTuple_New(ncols);
    if (values == NULL)
        return NULL;
    for (int i = 0; i < ncols; i++) {
        if (p >= end)
            goto malformed;
        unsigned char kind = buf[p];
        PyObject *v;
        if (kind == 't' || kind == 'b') {
            if (p + 5 > end)
                goto malformed;
            uint32_t length = read_u32(buf + p + 1);
            p += 5;
            if (length >= 0x80000000u || (Py_ssize_t)length > end - p)
                goto malformed;
            if (kind == 't') {
                v = PyUnicode_DecodeUTF8((const char *)buf + p, (Py_ssize_t)length, NULL);
                if (v == NULL) {
                    if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
                        goto failed;
                    PyErr_Clear();
                    goto malformed;
                }
            }
            else {
                v = PyBytes_FromStringAndSize((const char *)buf + p, (Py_ssize_t)length);
                if (v == NULL)
                    goto failed;
            }
            p += (Py_ssize_t)length;
        }
        else if (kind == 'n') {
            v = Py_None;
            Py_INCREF(v);
            p += 1;
        }
        else if (kind == 'u') {
            v = toast;
            Py_INCREF(v);
            p += 1;
        }
        else
            goto malformed;
        PyTuple_SET_ITEM(values, i, v);
    }
    *pos = p;
    return values;
malformed:  /* no exception set */
failed:     /* out of memory: the exception stays set */
    Py_DECREF(values);
    return NULL;
}

static PyObject *
read_row(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "read_row(buf, streamed, toast)");
        return NULL;
    }
    PyObject *data = args[0];
    if (!PyBytes_CheckExact(data))
        Py_RETURN_NONE;  /* the Python decoder decides what to do with it */
    int streamed = PyObject_IsTrue(args[1]);
    if (streamed < 0)
        return NULL;
    PyObject *toast = args[2];
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t end = PyBytes_GET_SIZE(data);
    Py_ssize_t start = 1;
    PyObject *xid = NULL, *old = NULL, *new = NULL, *result = NULL;

    if (end < 1)
        Py_RETURN_NONE;
    unsigned char tag = buf[0];
    if (tag != 'I' && tag != 'U' && tag != 'D')
        Py_RETURN_NONE;
    if (streamed) {
        if (end < 5)
            Py_RETURN_NONE;
        xid = PyLong_FromUnsignedLong(read_u32(buf + 1));
        if (xid == NULL)
            return NULL;
        start = 5;
    }
    else {
        xid = Py_None;
        Py_INCREF(xid);
    }
    if (end < start + 5)
        goto fallback;
    uint32_t oid = read_u32(buf + start);
    unsigned char action = buf[start + 4];
    Py_ssize_t pos = start + 5;
    if (tag == 'U') {
        if (action != 'N') {
            if (action != 'K' && action != 'O')
                goto fallback;
            old = read_tuple(buf, end, &pos, toast);
            if (old == NULL)
                goto fallback;
            if (pos >= end || buf[pos] != 'N')
                goto fallback;
            pos += 1;
        }
        new = read_tuple(buf, end, &pos, toast);
        if (new == NULL)
            goto fallback;
    }
    else if (tag == 'I') {
        if (action != 'N')
            goto fallback;
        new = read_tuple(buf, end, &pos, toast);
        if (new == NULL)
            goto fallback;
    }
    else {
        if (action != 'K' && action != 'O')
            goto fallback;
        old = read_tuple(buf, end, &pos, toast);
        if (old == NULL)
            goto fallback;
    }
    if (pos != end)
        goto fallback;
    if (old == NULL) {
        old = Py_None;
        Py_INCREF(old);
    }
    if (new == NULL) {
        new = Py_None;
        Py_INCREF(new);
    }
    result = Py_BuildValue("(NiIiNN)", xid, (int)tag, (unsigned int)oid, (int)action, old, new);
    return result;  /* Py_BuildValue's "N" took the references (and drops them on failure) */

fallback:
    Py_XDECREF(xid);
    Py_XDECREF(old);
    Py_XDECREF(new);
    if (PyErr_Occurred())
        return NULL;  /* out of memory: not a protocol error */
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"read_row", (PyCFunction)(void (*)(void))read_row, METH_FASTCALL,
     "read_row(buf, streamed, toast) -> row tuple, or None when the Python decoder must decide"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_speedups",
    .m_doc = "The pgoutput row decoder's hot path in C (see _speedups.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
