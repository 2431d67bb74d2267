"""cffi build script for ``vscsid.workers._fast`` (out-of-line API mode).

The data plane needs a few things CPython cannot express: full memory fences
and single-copy-atomic 16-bit loads/stores on the shared ring. Those are the
only C in this first version; hot loops may join later, always with the
pure-Python code kept as the readable reference.
"""
from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    void vq_mb(void);
    void vq_rmb(void);
    void vq_wmb(void);
    uint16_t vq_load_u16(const uint8_t *base, size_t off);
    void vq_store_u16(uint8_t *base, size_t off, uint16_t value);
    """
)

ffibuilder.set_source(
    "vscsid.workers._fast",
    r"""
    #include <stdint.h>
    #include <stddef.h>

    static void vq_mb(void)  { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static void vq_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    static void vq_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

    static uint16_t vq_load_u16(const uint8_t *base, size_t off)
    {
        return __atomic_load_n((const uint16_t *)(base + off), __ATOMIC_ACQUIRE);
    }

    static void vq_store_u16(uint8_t *base, size_t off, uint16_t value)
    {
        __atomic_store_n((uint16_t *)(base + off), value, __ATOMIC_RELEASE);
    }
    """,
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
