# C++ twin: examples/shared_memory.cpp
# A block of shared memory: the parent writes four bytes into it, a child reads the first five
# (the fifth is still zero), writes one more, and the parent sees it.
from multiprocessing import Process, shared_memory


def child(name):
    shm_b = shared_memory.SharedMemory(name)   # attach to the block by its name
    print(bytes(shm_b.buf[:5]))                # b'\x16!,7\x00'
    shm_b.buf[4] = 66
    shm_b.close()


if __name__ == '__main__':
    shm_a = shared_memory.SharedMemory(create=True, size=10)
    buffer = shm_a.buf
    buffer[:4] = bytearray([22, 33, 44, 55])
    p = Process(target=child, args=(shm_a.name,))
    p.start()
    p.join()
    print(bytes(shm_a.buf[:5]))                # b'\x16!,7B'
    shm_a.close()
    shm_a.unlink()                             # the block has a name in /dev/shm until unlinked
