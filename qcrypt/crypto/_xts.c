/* Optional accelerator: AES-XTS over many 512-byte sectors in one call, built on OpenSSL's AES-ECB.
 *
 * xts_crypt(key, source, target, first_sector, encrypt, plain32) encrypts or decrypts every 512-byte sector of
 * `source` into `target` (same length; may be the same buffer). Sector i uses the tweak IV
 * LE64(first_sector + i) followed by 8 zero bytes (dm-crypt/QEMU "plain64"), or with `plain32` its low 32 bits
 * only ("plain"). The key is both XTS halves (32 or 64 bytes): the first encrypts the data, the second the
 * tweak (IEEE 1619). The GIL is released while OpenSSL works.
 *
 * Why ECB: OpenSSL's XTS cipher takes one tweak per initialisation, and re-initialising it for every 512-byte
 * sector costs more than encrypting the sector (OpenSSL 3 looks the parameters up by name each time). Here, per
 * batch of sectors, one ECB call encrypts all the tweak IVs with the second key; the 32 block tweaks of each
 * sector follow by doubling in GF(2^128) (shift left, 0x87 folded back into the low byte); one ECB call over
 * the batch, between two XORs with those tweaks, does the data. Identical key halves are accepted, as the numpy
 * path accepts them (OpenSSL's XTS refuses them for encryption).
 *
 * qcrypt works without this module (qcrypt/crypto/sector.py falls back to numpy; the tests run both paths and
 * compare them with OpenSSL's own XTS).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#define SECTOR_BYTES 512
#define BLOCK_BYTES 16
#define BLOCKS_PER_SECTOR (SECTOR_BYTES / BLOCK_BYTES)
#define BATCH_SECTORS 64 /* 32 KiB of tweaks per batch: stays in the L1/L2 cache */

static uint64_t load_le64(const unsigned char *p)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
#else
    uint64_t v = 0;
    for (int b = 7; b >= 0; b--)
        v = (v << 8) | p[b];
    return v;
#endif
}

static void store_le64(unsigned char *p, uint64_t v)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(p, &v, 8);
#else
    for (int b = 0; b < 8; b++)
        p[b] = (unsigned char)(v >> (8 * b));
#endif
}

static void xor_words(unsigned char *target, const unsigned char *a, const unsigned char *b, size_t bytes)
{
    for (size_t i = 0; i < bytes; i += 8) {
        uint64_t x, y;
        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        x ^= y;
        memcpy(target + i, &x, 8);
    }
}

static int crypt_sectors(const EVP_CIPHER *ecb, const unsigned char *key, size_t half, const unsigned char *source,
                         unsigned char *target, Py_ssize_t sectors, uint64_t first_sector, int encrypt,
                         int plain32)
{
    unsigned char ivs[BATCH_SECTORS * BLOCK_BYTES];
    unsigned char first_tweaks[BATCH_SECTORS * BLOCK_BYTES];
    unsigned char tweaks[BATCH_SECTORS * SECTOR_BYTES];
    EVP_CIPHER_CTX *data = EVP_CIPHER_CTX_new();
    EVP_CIPHER_CTX *tweak = EVP_CIPHER_CTX_new();
    int ok = data != NULL && tweak != NULL && EVP_CipherInit_ex(data, ecb, NULL, key, NULL, encrypt) == 1
             && EVP_CipherInit_ex(tweak, ecb, NULL, key + half, NULL, 1) == 1
             && EVP_CIPHER_CTX_set_padding(data, 0) == 1 && EVP_CIPHER_CTX_set_padding(tweak, 0) == 1;
    for (Py_ssize_t done = 0; ok && done < sectors; done += BATCH_SECTORS) {
        Py_ssize_t count = sectors - done < BATCH_SECTORS ? sectors - done : BATCH_SECTORS;
        int batch_bytes = (int)(count * SECTOR_BYTES), written = 0;
        memset(ivs, 0, sizeof ivs);
        for (Py_ssize_t k = 0; k < count; k++) {
            uint64_t sector = first_sector + (uint64_t)(done + k);
            store_le64(ivs + k * BLOCK_BYTES, plain32 ? (sector & 0xffffffffu) : sector);
        }
        ok = EVP_CipherUpdate(tweak, first_tweaks, &written, ivs, (int)(count * BLOCK_BYTES)) == 1
             && written == (int)(count * BLOCK_BYTES);
        if (!ok)
            break;
        for (Py_ssize_t k = 0; k < count; k++) {
            uint64_t low = load_le64(first_tweaks + k * BLOCK_BYTES);
            uint64_t high = load_le64(first_tweaks + k * BLOCK_BYTES + 8);
            unsigned char *t = tweaks + k * SECTOR_BYTES;
            for (int j = 0; j < BLOCKS_PER_SECTOR; j++) {
                store_le64(t + j * BLOCK_BYTES, low);
                store_le64(t + j * BLOCK_BYTES + 8, high);
                uint64_t carry = high >> 63;
                high = (high << 1) | (low >> 63);
                low = (low << 1) ^ (carry ? 0x87u : 0u);
            }
        }
        unsigned char *out = target + done * SECTOR_BYTES;
        xor_words(out, source + done * SECTOR_BYTES, tweaks, (size_t)batch_bytes);
        ok = EVP_CipherUpdate(data, out, &written, out, batch_bytes) == 1 && written == batch_bytes;
        if (ok)
            xor_words(out, out, tweaks, (size_t)batch_bytes);
    }
    EVP_CIPHER_CTX_free(data);
    EVP_CIPHER_CTX_free(tweak);
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
        const EVP_CIPHER *ecb = key.len == 32 ? EVP_aes_128_ecb() : EVP_aes_256_ecb();
        Py_BEGIN_ALLOW_THREADS
        ok = crypt_sectors(ecb, key.buf, (size_t)key.len / 2, source.buf, target.buf, source.len / SECTOR_BYTES,
                           (uint64_t)first_sector, encrypt, plain32);
        Py_END_ALLOW_THREADS
        if (!ok)
            problem = "OpenSSL refused the AES operation";
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
    {"xts_crypt", xts_crypt, METH_VARARGS, "AES-XTS over 512-byte sectors with plain64/plain tweaks (on AES-ECB)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_xts", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__xts(void) { return PyModule_Create(&module); }
