# A Python tutorial program: a Pool shares a Manager dict among its tasks; starmap passes each task
# the dict and a number to add. Its C++ twin is examples/shared_dict.cpp.
#
# The output may differ from run to run: `dic['count'] += c` reads the value, adds, and writes it
# back, with nothing to stop two processes from doing so at once. If the task adding 3 and the one
# adding 4 both read 3, whichever writes last wins and the other's addition is lost: it prints
# dic={'count': 15} or less. (mproc's SharedDict makes `+=` one atomic step: 15 every run.)
# The try/except stops the pool's workers if the main process fails, rather than leaving them as
# orphans, still running and holding memory.
from multiprocessing import Pool, Manager
import time

def func(dic, c):
    dic['count'] += c

if __name__=="__main__":
    try:
        d = Manager().dict()    # a dict shared between processes
        d['count'] = 0

        # the arguments: one tuple per task
        args = [(d,1), (d,2), (d,3), (d,4), (d,5)]
        pool = Pool(5)
        pool.starmap(func, args)

        pool.close()    # the pool takes no more tasks
        pool.join()     # waits until every worker has finished; called after pool.close()
        print(f'dic={d}')
    except:
        pool.terminate()
