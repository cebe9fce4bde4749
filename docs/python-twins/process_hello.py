# A Python tutorial program: a Process running a function with an argument.
# Its C++ twin is examples/process_hello.cpp. Prints: hello bob
from multiprocessing import Process

def f(name):
    print('hello', name)

if __name__ == '__main__':
    p = Process(target=f, args=('bob',))
    p.start()
    p.join()
