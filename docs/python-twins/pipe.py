# A Python tutorial program: the two ends of a Pipe, each with send() and recv() (duplex); the child
# sends a list through its end, the parent receives it. Its C++ twin is examples/pipe.cpp.
from multiprocessing import Process, Pipe

def f(conn):
    conn.send([42, None, 'hello'])
    conn.close()

if __name__ == '__main__':
    parent_conn, child_conn = Pipe()
    p = Process(target=f, args=(child_conn,))
    p.start()
    print(parent_conn.recv())   # prints "[42, None, 'hello']"
    p.join()
