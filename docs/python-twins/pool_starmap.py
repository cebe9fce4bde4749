# A Python tutorial program: Pool.starmap applies one function to many argument tuples. The workers
# run in any order, but the output is in input order.
# Its C++ twin is examples/pool_starmap.cpp.
from multiprocessing import Pool

def my_print(x, y):
    print(x + y)    # sometimes 2 4 3 6 5
    return(x + y)

if __name__ == '__main__':
    x = [1, 2, 3, 4, 5]
    y = [1, 1, 1, 1, 1]

    zip_args = list(zip(x, y))
    pool = Pool(5)
    output = pool.starmap(my_print, zip_args)
    pool.close()
    pool.join()

    print(output)   # always [2, 3, 4, 5, 6]
