/*
 * ckptdiff._watchdog: end the process with one line and exit code 2 when a
 * C library call never returns.
 *
 * A corrupted HDF5 file can make the HDF5 library loop forever inside one
 * call, holding the GIL: no Python thread, signal handler or timer can run
 * then. This module's thread is plain C and needs no GIL: armed with a
 * deadline and a message, it writes the message to stderr and calls _exit(2)
 * if it is not disarmed in time. Only the CLI arms it (a library must not
 * end its caller's process); see ckptdiff/watchdog.py.
 *
 *   arm(seconds, message: bytes)   start (or restart) the countdown
 *   disarm()                       stop it
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef _WIN32
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static int started = 0;
static int armed = 0;
static struct timespec deadline;
static char message[1024];
static size_t message_len = 0;

/* A forked child has no watchdog thread: start afresh there (at most one
 * thread of the parent held the lock, and none runs in the child). */
static void after_fork_in_child(void)
{
    pthread_mutex_init(&lock, NULL);
    pthread_cond_init(&changed, NULL);
    started = 0;
    armed = 0;
}

static void *watch(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&lock);
    for (;;) {
        if (!armed) {
            pthread_cond_wait(&changed, &lock);
            continue;
        }
        int rc = pthread_cond_timedwait(&changed, &lock, &deadline);
        if (rc == ETIMEDOUT && armed) {
            struct timespec now;
            clock_gettime(CLOCK_REALTIME, &now);
            if (now.tv_sec > deadline.tv_sec || (now.tv_sec == deadline.tv_sec && now.tv_nsec >= deadline.tv_nsec)) {
                size_t off = 0;
                while (off < message_len) {
                    ssize_t n = write(2, message + off, message_len - off);
                    if (n <= 0)
                        break;
                    off += (size_t)n;
                }
                _exit(2);
            }
        }
    }
    return NULL;
}

static PyObject *arm(PyObject *self, PyObject *args)
{
    double seconds;
    Py_buffer msg;
    (void)self;
    if (!PyArg_ParseTuple(args, "dy*:arm", &seconds, &msg))
        return NULL;
    if (!(seconds > 0) || seconds > 1e9) {
        PyBuffer_Release(&msg);
        return PyErr_Format(PyExc_ValueError, "seconds must be positive");
    }
    pthread_mutex_lock(&lock);
    message_len = (size_t)msg.len < sizeof message ? (size_t)msg.len : sizeof message;
    memcpy(message, msg.buf, message_len);
    PyBuffer_Release(&msg);
    clock_gettime(CLOCK_REALTIME, &deadline);
    double whole = (double)(time_t)seconds;
    deadline.tv_sec += (time_t)seconds;
    deadline.tv_nsec += (long)((seconds - whole) * 1e9);
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec += 1;
        deadline.tv_nsec -= 1000000000L;
    }
    armed = 1;
    if (!started) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, watch, NULL);
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            armed = 0;
            pthread_mutex_unlock(&lock);
            return PyErr_Format(PyExc_OSError, "cannot start the watchdog thread (error %d)", rc);
        }
        started = 1;
    }
    pthread_cond_signal(&changed);
    pthread_mutex_unlock(&lock);
    Py_RETURN_NONE;
}

static PyObject *disarm(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    pthread_mutex_lock(&lock);
    armed = 0;
    pthread_cond_signal(&changed);
    pthread_mutex_unlock(&lock);
    Py_RETURN_NONE;
}

static int setup(void)
{
    return pthread_atfork(NULL, NULL, after_fork_in_child);
}

#define AVAILABLE 1
#else /* _WIN32: no watchdog; the Python side then runs unguarded */
static PyObject *arm(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    Py_RETURN_NONE;
}

static PyObject *disarm(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    Py_RETURN_NONE;
}

static int setup(void)
{
    return 0;
}

#define AVAILABLE 0
#endif

static PyMethodDef methods[] = {
    {"arm", arm, METH_VARARGS, "arm(seconds, message): after `seconds`, write `message` to stderr and _exit(2)"},
    {"disarm", disarm, METH_NOARGS, "disarm(): stop the countdown"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_watchdog", "A C-level deadline for library calls that may never return.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__watchdog(void)
{
    if (setup() != 0) {
        PyErr_SetString(PyExc_OSError, "cannot register the watchdog's fork handler");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "AVAILABLE", AVAILABLE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
