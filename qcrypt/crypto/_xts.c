/* Optional accelerator: AES-XTS over many 512-byte sectors in one call, through OpenSSL's own XTS.
 *
 * xts_crypt(key, source, target, first_sector, encrypt, plain32) encrypts or decrypts every 512-byte sector of
 * `source` into `target` (same length; may be the same buffer). Sector i uses the tweak IV
 * LE64(first_sector + i) followed by 8 zero bytes (dm-crypt/QEMU "plain64"), or with `plain32` its low 32 bits
 * only ("plain"). The key is both XTS halves (32 or 64 bytes). Raises ValueError when OpenSSL refuses (e.g.
 * identical key halves, which OpenSSL rejects for encryption): the caller then uses the numpy path, which
 * gives the same bytes. The GIL is released while OpenSSL works.
 *
 * qcrypt works without this module (qcrypt/crypto/sector.py falls back to numpy; the tests run both paths).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <stdint.h>

#define SECTOR_BYTES 512

static int crypt_sectors(const EVP_CIPHER *cipher, const unsigned char *key, const unsigned char *source,
                         unsigned char *target, Py_ssize_t sectors, uint64_t first_sector, int encrypt,
                         int plain32)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int ok = ctx != NULL && EVP_CipherInit_ex(ctx, cipher, NULL, key, NULL, encrypt) == 1;
    for (Py_ssize_t i = 0; ok && i < sectors; i++) {
        unsigned char iv[16] = {0};
        uint64_t sector = first_sector + (uint64_t)i;
        if (plain32)
            sector &= 0xffffffffu;
        for (int b = 0; b < 8; b++)
            iv[b] = (unsigned char)(sector >> (8 * b));
        int written = 0;
        Py_ssize_t offset = i * SECTOR_BYTES;
        ok = EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1) == 1
             && EVP_CipherUpdate(ctx, target + offset, &written, source + offset, SECTOR_BYTES) == 1
             && written == SECTOR_BYTES;
    }
    EVP_CIPHER_CTX_free(ctx);
    return ok;
}

static PyObject *xts_crypt(PyObject *self, PyObject *args)
{
    Py_buffer key, source, target;
    unsigned long long first_sector;
    int encrypt, plain32;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*w*Kpp", &key, &source, &target, &first_sector, &encrypt, &plain32))
        return NULL;
    const char *problem = NULL;
    if (key.len != 32 && key.len != 64)
        problem = "XTS key must be 32 or 64 bytes";
    else if (source.len != target.len || source.len % SECTOR_BYTES != 0)
        problem = "source and target must be the same whole number of 512-byte sectors";
    int ok = 0;
    if (problem == NULL) {
        const EVP_CIPHER *cipher = key.len == 32 ? EVP_aes_128_xts() : EVP_aes_256_xts();
        Py_BEGIN_ALLOW_THREADS
        ok = crypt_sectors(cipher, key.buf, source.buf, target.buf, source.len / SECTOR_BYTES,
                           (uint64_t)first_sector, encrypt, plain32);
        Py_END_ALLOW_THREADS
        if (!ok)
            problem = "OpenSSL refused the XTS operation";
    }
    PyBuffer_Release(&key);
    PyBuffer_Release(&source);
    PyBuffer_Release(&target);
    if (problem != NULL) {
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"xts_crypt", xts_crypt, METH_VARARGS, "AES-XTS over 512-byte sectors with plain64/plain tweaks."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_xts", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__xts(void) { return PyModule_Create(&module); }
