# A Python tutorial program: a child puts an item on a Queue, the parent gets it (q.get() blocks
# until an item arrives). Its C++ twin is examples/queue.cpp. (The file is not named queue.py: run
# as a script, it would shadow the standard library's queue module, which multiprocessing imports.)
from multiprocessing import Process, Queue

def f(q):
    q.put([42, None, 'hello'])

if __name__ == '__main__':
    q = Queue()
    p = Process(target=f, args=(q,))
    p.start()
    print(q.get())    # prints "[42, None, 'hello']"
    p.join()
