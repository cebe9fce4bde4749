# A Python tutorial program: Pool.apply_async with a callback. The results arrive in completion
# order, not input order: it may print [1, 0, 4, 9, 25, 16, 49, 36, 81, 64].
# Its C++ twin is examples/pool_apply_async.cpp.
from multiprocessing import Pool

def foo_pool(x):
    return x*x

result_list = []
def log_result(result):
    # This is called whenever foo_pool(i) returns a result.
    # result_list is modified only by the main process, not the pool workers.
    result_list.append(result)

if __name__ == '__main__':
    pool = Pool()
    for i in range(10):
        pool.apply_async(foo_pool, args = (i, ), callback = log_result)
    pool.close()
    pool.join()
    print(result_list)
